//! Real C and C++ consumers: install into a temporary prefix, find the
//! package with CMake (and pkg-config), build with -Wall -Wextra -Werror and
//! with AddressSanitizer + UBSan, and run the hosts; the threaded C++ hosts
//! also run under ThreadSanitizer against a TSan build of the library.
use std::path::Path;
use std::process::Command;

use crate::{repo_root, TempDir};

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{what} failed ({}):\n{text}", out.status);
    text
}

/// The profile directory the test binary's library was built into.
fn profile() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}

fn install(prefix: &Path) {
    let built = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into()))
        .join(profile())
        .join("libtezzeret.so");
    assert!(built.exists(), "{} is missing: run `cargo build --lib` first (scripts/test.sh does)", built.display());
    run(
        Command::new("bash")
            .arg(repo_root().join("scripts/install.sh"))
            .args(["--prefix", prefix.to_str().unwrap(), "--profile", profile(), "--no-build"]),
        "scripts/install.sh",
    );
    let lib = prefix.join("lib");
    for name in ["libtezzeret.so", "libtezzeret.so.0", "libtezzeret.a", "cmake/Tezzeret/TezzeretConfig.cmake", "pkgconfig/tezzeret.pc"] {
        assert!(lib.join(name).exists(), "{name} installed");
    }
    assert!(prefix.join("include/tezzeret.h").exists());
    let soname = run(Command::new("readelf").args(["-d"]).arg(lib.join("libtezzeret.so")), "readelf");
    assert!(soname.contains("Library soname: [libtezzeret.so.0]"), "{soname}");
    assert!(soname.contains("libtorch_cuda.so"), "libtorch_cuda stays linked:\n{soname}");
    assert!(soname.contains("RUNPATH") || soname.contains("RPATH"), "an rpath to libtorch is baked in");
}

fn build_and_run(prefix: &Path, build: &Path, sanitize: &str) {
    run(
        Command::new("cmake")
            .arg("-S")
            .arg(repo_root().join("cpp-examples"))
            .arg("-B")
            .arg(build)
            .arg(format!("-DCMAKE_PREFIX_PATH={}", prefix.display()))
            .arg(format!("-DTEZZERET_EXAMPLES_SANITIZE={sanitize}"))
            .arg("-DCMAKE_BUILD_TYPE=Debug"),
        "cmake configure",
    );
    run(Command::new("cmake").arg("--build").arg(build).arg("-j2"), "cmake build");
    for host in ["host_c", "host_cpp", "host_kernel", "host_runtime", "host_threads"] {
        // No LD_LIBRARY_PATH: the hosts find libtezzeret and libtorch by rpath.
        let output = run(Command::new(build.join(host)).env_remove("LD_LIBRARY_PATH"), host);
        assert!(output.contains(&format!("{host}: all expectations met")), "{output}");
    }
}

#[test]
fn c_and_cpp_hosts_build_with_cmake_and_run_plain_and_sanitized() {
    let work = TempDir::new("consumers");
    let prefix = work.path().join("prefix");
    install(&prefix);
    build_and_run(&prefix, &work.path().join("build"), "");
    build_and_run(&prefix, &work.path().join("build-asan"), "address,undefined");
}

/// The ThreadSanitizer build of the library (scripts/build-tsan.sh).
fn tsan_library_dir() -> std::path::PathBuf {
    let target = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into()))
        .join("tsan");
    std::fs::read_dir(&target)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("debug"))
        .find(|d| d.join("libtezzeret.so").exists())
        .unwrap_or_else(|| panic!("no TSan build under {}: run scripts/build-tsan.sh (scripts/test.sh does)", target.display()))
}

#[test]
fn threaded_hosts_run_clean_under_thread_sanitizer() {
    let work = TempDir::new("tsan");
    let prefix = work.path().join("prefix");
    let lib_dir = tsan_library_dir();
    run(
        Command::new("bash")
            .arg(repo_root().join("scripts/install.sh"))
            .args(["--prefix", prefix.to_str().unwrap(), "--lib-dir", lib_dir.to_str().unwrap()]),
        "scripts/install.sh --lib-dir",
    );
    let build = work.path().join("build-tsan");
    run(
        Command::new("cmake")
            .arg("-S")
            .arg(repo_root().join("cpp-examples"))
            .arg("-B")
            .arg(&build)
            .arg(format!("-DCMAKE_PREFIX_PATH={}", prefix.display()))
            .arg("-DTEZZERET_EXAMPLES_SANITIZE=thread")
            .arg("-DCMAKE_BUILD_TYPE=Debug"),
        "cmake configure (thread sanitizer)",
    );
    // Hosts with threads of their own: several share one forge and one closes it.
    let hosts = ["host_runtime", "host_cpp", "host_threads"];
    run(Command::new("cmake").arg("--build").arg(&build).arg("-j2").arg("--target").args(hosts), "cmake build (thread sanitizer)");
    let suppressions = repo_root().join("cpp-examples/tsan.supp");
    for host in hosts {
        let output = run(
            Command::new(build.join(host))
                .env_remove("LD_LIBRARY_PATH")
                .env("TSAN_OPTIONS", format!("halt_on_error=1 exitcode=66 suppressions={}", suppressions.display())),
            host,
        );
        assert!(output.contains(&format!("{host}: all expectations met")), "{output}");
        assert!(!output.contains("ThreadSanitizer"), "{host} under TSan:\n{output}");
    }
}

#[test]
fn pkg_config_describes_the_installed_library() {
    let work = TempDir::new("pkgconfig");
    let prefix = work.path().join("prefix");
    install(&prefix);
    let flags = run(
        Command::new("pkg-config")
            .args(["--cflags", "--libs", "tezzeret"])
            .env("PKG_CONFIG_PATH", prefix.join("lib/pkgconfig")),
        "pkg-config",
    );
    let exe = work.path().join("host_c_pc");
    let mut cc = Command::new("cc");
    cc.args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(&exe)
        .arg(repo_root().join("cpp-examples/host_c.c"))
        .args(flags.split_whitespace());
    run(&mut cc, "cc with pkg-config flags");
    let output = run(&mut Command::new(&exe), "host_c (pkg-config build)");
    assert!(output.contains("host_c: all expectations met"));
}
