//! Build script: compiles the libtorch shim, bakes rpath/SONAME into the
//! produced binaries, and generates the C header with cbindgen.
use std::env;
use std::path::{Path, PathBuf};

include!("src/base/abi_version.rs");

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());

    let lib_dir = PathBuf::from(
        env::var("DEP_TCH_LIBTORCH_LIB")
            .expect("torch-sys did not report its libtorch lib dir (DEP_TCH_LIBTORCH_LIB)"),
    );
    build_shim(&lib_dir);
    link_settings(&lib_dir);
    generate_header(&manifest_dir, &out_dir);

    println!("cargo:rustc-env=TEZZERET_LIBTORCH_LIB={}", lib_dir.display());
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/base/abi_version.rs");
}

/// The C++ shim reaches torch::jit::freeze / optimize_for_inference.
fn build_shim(lib_dir: &Path) {
    let root = lib_dir.parent().expect("libtorch lib dir has a parent");
    println!("cargo:rerun-if-changed=shim/tezzeret_shim.cpp");
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("shim/tezzeret_shim.cpp")
        .compile("tezzeret_shim");
}

/// rpath to libtorch so nothing needs LD_LIBRARY_PATH; keep libtorch_cuda
/// linked although no symbol of it is referenced (else CUDA silently vanishes);
/// a SONAME carrying the ABI major on the cdylib.
fn link_settings(lib_dir: &Path) {
    // For the Python wheel: the installed torch package beside the library
    // (site-packages/tezzeret/ → site-packages/torch/lib), searched first.
    println!("cargo:rustc-cdylib-link-arg=-Wl,-rpath,$ORIGIN/../torch/lib");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    if lib_dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-L{}", lib_dir.display());
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libtezzeret.so.{ABI_MAJOR}");
}

/// Generates the header into OUT_DIR; the committed `include/tezzeret.h` is
/// compared against it by a test. `TEZZERET_UPDATE_HEADER=1` rewrites it.
fn generate_header(manifest_dir: &Path, out_dir: &Path) {
    for path in ["src/ffi", "cbindgen.toml"] {
        println!("cargo:rerun-if-changed={path}");
    }
    println!("cargo:rerun-if-env-changed=TEZZERET_UPDATE_HEADER");
    let mut config = cbindgen::Config::from_file(manifest_dir.join("cbindgen.toml"))
        .expect("cbindgen.toml is readable");
    let version = env::var("CARGO_PKG_VERSION").unwrap();
    let numbers: Vec<&str> = version.split(['.', '-', '+']).take(3).collect();
    config.after_includes = Some(format!(
        "\n/* The library version this header belongs to. */\n\
         #define TEZZERET_VERSION \"{version}\"\n\
         #define TEZZERET_VERSION_MAJOR {}\n#define TEZZERET_VERSION_MINOR {}\n#define TEZZERET_VERSION_PATCH {}\n",
        numbers[0], numbers[1], numbers[2]
    ));
    let generated = out_dir.join("tezzeret.h");
    // Only the ffi layer's items belong in the header (cbindgen follows its `mod`s).
    cbindgen::Builder::new()
        .with_config(config)
        .with_src(manifest_dir.join("src/ffi/mod.rs"))
        .generate()
        .expect("cbindgen generates the header")
        .write_to_file(&generated);
    println!("cargo:rustc-env=TEZZERET_GENERATED_HEADER={}", generated.display());
    if env::var("TEZZERET_UPDATE_HEADER").as_deref() == Ok("1") {
        std::fs::copy(&generated, manifest_dir.join("include/tezzeret.h"))
            .expect("include/tezzeret.h is writable");
    }
}
