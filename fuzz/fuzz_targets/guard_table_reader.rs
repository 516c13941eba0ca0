//! Fuzzes the guard-table reader: any file contents must open with an
//! error or give lookups that return entries, "missing" or an error —
//! never a panic or a read outside the mapping.
#![no_main]
use std::io::Write;

use libfuzzer_sys::fuzz_target;
use tezzeret::state::guard_table::{GuardTable, Lookup};

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("tezzeret-fuzz-guards-{}", std::process::id()));
    std::fs::File::create(&path).and_then(|mut f| f.write_all(data)).expect("temp file");
    if let Ok(table) = GuardTable::open_read_only(&path) {
        for id in ["BP001", "BP016", "x"] {
            if let Ok(Lookup::Found(entry)) = table.lookup(id) {
                assert_eq!(entry.blueprint_id, id);
                let _ = entry.digest_matches();
            }
        }
        let _ = table.entries();
    }
});
