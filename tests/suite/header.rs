//! The committed C header must equal a fresh cbindgen generation.

#[test]
fn committed_header_matches_fresh_generation() {
    let generated = std::fs::read_to_string(env!("TEZZERET_GENERATED_HEADER")).expect("generated header");
    let committed = std::fs::read_to_string(crate::repo_root().join("include/tezzeret.h")).expect("committed header");
    assert!(
        generated == committed,
        "include/tezzeret.h differs from the header cbindgen generates from src/ffi; \
         run scripts/update-header.sh and commit the result"
    );
}

#[test]
fn header_carries_the_library_versions() {
    let header = std::fs::read_to_string(crate::repo_root().join("include/tezzeret.h")).unwrap();
    let version = tezzeret::base::version::LIBRARY_VERSION;
    assert!(header.contains(&format!("#define TEZZERET_VERSION \"{version}\"")));
    assert!(header.contains(&format!("#define TEZZERET_ABI_MAJOR {}", tezzeret::base::version::ABI_MAJOR)));
    assert!(header.contains(&format!("#define TEZZERET_ABI_MINOR {}", tezzeret::base::version::ABI_MINOR)));
    assert!(header.contains("static inline tezzeret_status *tezzeret_check_header_abi(void)"));
}
