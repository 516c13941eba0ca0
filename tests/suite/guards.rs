//! The guard table: lookups, torn slots never accepted, rebuild at
//! open, the read-only C ABI, and a reader process racing a writer process
//! that is killed mid-update.
use std::ffi::{CStr, CString};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use tezzeret::ffi::*;
use tezzeret::state::guard_table::{GuardEntry, GuardTable, Lookup, HEADER_SIZE, SLOT_SIZE};
use tezzeret::build::guard_spec::{GuardSpec, InputGuard};
use tezzeret::ErrorCode;

use crate::TempDir;

fn entry(id: &str, variant: u8) -> GuardEntry {
    let dim = 8 + i64::from(variant);
    let spec = GuardSpec(vec![
        InputGuard { index: 0, shape: vec![dim, 32], dtype: tezzeret::base::dtype::Dtype::Float32, stride: vec![32, 1], requires_grad: false },
        InputGuard { index: 1, shape: vec![dim, 4, 4, 3], dtype: tezzeret::base::dtype::Dtype::Float32, stride: vec![48, 12, 3, 1], requires_grad: false },
    ]);
    let digest = spec.digest();
    GuardEntry::new(id, &format!("{:02x}", variant).repeat(32), &digest, "cpu", variant % 2 == 0, &spec).unwrap()
}

#[test]
fn put_lookup_replace_remove() {
    let dir = TempDir::new("guards-basic");
    let path = dir.path().join("guards.tbl");
    let table = GuardTable::create(&path, 64).unwrap();
    for i in 0..40 {
        table.put(&entry(&format!("BP{i:03}"), 1)).unwrap();
    }
    let reader = GuardTable::open_read_only(&path).unwrap();
    assert_eq!(reader.lookup("BP007").unwrap(), Lookup::Found(entry("BP007", 1)));
    assert_eq!(reader.lookup("BP999").unwrap(), Lookup::Missing);
    table.put(&entry("BP007", 2)).unwrap();
    assert_eq!(reader.lookup("BP007").unwrap(), Lookup::Found(entry("BP007", 2)));
    table.remove("BP007").unwrap();
    assert_eq!(reader.lookup("BP007").unwrap(), Lookup::Missing);
    // Entries probing past the removed slot are still found.
    for i in (0..40).filter(|i| *i != 7) {
        assert!(matches!(reader.lookup(&format!("BP{i:03}")).unwrap(), Lookup::Found(_)));
    }
    assert!(entry("BP001", 3).digest_matches());
}

fn slot_of(path: &Path, id: &str) -> usize {
    let bytes = std::fs::read(path).unwrap();
    (0..(bytes.len() - HEADER_SIZE) / SLOT_SIZE)
        .find(|s| {
            let at = HEADER_SIZE + s * SLOT_SIZE + 16;
            bytes[at..at + id.len()] == *id.as_bytes() && bytes[at + id.len()] == 0
        })
        .unwrap()
}

#[test]
fn torn_slots_are_never_accepted() {
    let dir = TempDir::new("guards-torn");
    let path = dir.path().join("guards.tbl");
    GuardTable::create(&path, 16).unwrap().put(&entry("BP1", 1)).unwrap();
    let slot = HEADER_SIZE + slot_of(&path, "BP1") * SLOT_SIZE;
    let clean = std::fs::read(&path).unwrap();
    // Every single-bit flip anywhere in the slot: an error, or (for bytes
    // past the slot's content, which nothing reads) the unchanged entry —
    // never different data.
    let mut refused = 0;
    for byte in 8..SLOT_SIZE {
        let mut torn = clean.clone();
        torn[slot + byte] ^= 0x10;
        std::fs::write(&path, &torn).unwrap();
        let table = GuardTable::open_read_only(&path).unwrap();
        match table.lookup("BP1") {
            Err(e) => {
                assert_eq!(e.code(), ErrorCode::Corrupt);
                refused += 1;
            }
            Ok(Lookup::Missing) => refused += 1, // the id bytes themselves were hit: a different id
            Ok(Lookup::Found(found)) => assert_eq!(found, entry("BP1", 1), "flip at byte {byte} gave different data"),
        }
    }
    // Every content byte (two inputs: up to 232 + 2·136) is covered.
    assert!(refused >= 232 + 2 * 136 - 8, "only {refused} flips refused");
    // A writer that died mid-update leaves an odd generation: busy, not data.
    let mut torn = clean.clone();
    torn[slot] |= 1;
    std::fs::write(&path, &torn).unwrap();
    let err = GuardTable::open_read_only(&path).unwrap().lookup("BP1").unwrap_err();
    assert!(err.message().contains("mid-update"), "{err}");
}

#[test]
fn the_c_abi_reads_a_table_without_a_forge() {
    let dir = TempDir::new("guards-abi");
    let path = dir.path().join("guards.tbl");
    GuardTable::create(&path, 16).unwrap().put(&entry("BP016", 2)).unwrap();
    let cpath = CString::new(path.to_str().unwrap()).unwrap();
    let mut table = std::ptr::null_mut();
    unsafe {
        assert!(tezzeret_guard_table_open(cpath.as_ptr(), &mut table).is_null());
        let mut out: tezzeret_guard_entry = std::mem::zeroed();
        out.struct_size = std::mem::size_of::<tezzeret_guard_entry>();
        let id = CString::new("BP016").unwrap();
        assert!(tezzeret_guard_table_lookup(table, id.as_ptr(), &mut out).is_null());
        assert_eq!(CStr::from_ptr(out.blueprint_id.as_ptr()).to_str().unwrap(), "BP016");
        assert_eq!(CStr::from_ptr(out.checksum.as_ptr()).to_str().unwrap(), "02".repeat(32));
        assert_eq!(CStr::from_ptr(out.guard_digest.as_ptr()).to_str().unwrap(), entry("BP016", 2).spec.digest());
        assert_eq!(out.input_count, 2);
        assert_eq!(out.inputs[1].rank, 4);
        assert_eq!(&out.inputs[1].shape[..4], &[10, 4, 4, 3]);
        assert_eq!(out.inputs[0].dtype, TEZZERET_DTYPE_FLOAT32);
        assert!(out.dynamic_batch);
        let missing = CString::new("BP404").unwrap();
        let st = tezzeret_guard_table_lookup(table, missing.as_ptr(), &mut out);
        assert_eq!(tezzeret_status_code(st), TEZZERET_CODE_NOT_FOUND);
        tezzeret_status_free(st);
        let st = tezzeret_guard_table_lookup(std::ptr::null(), id.as_ptr(), &mut out);
        assert_eq!(tezzeret_status_code(st), TEZZERET_CODE_NULL_ARGUMENT);
        tezzeret_status_free(st);
        let st = tezzeret_guard_table_lookup(table, id.as_ptr(), std::ptr::null_mut());
        assert_eq!(tezzeret_status_code(st), TEZZERET_CODE_NULL_ARGUMENT);
        tezzeret_status_free(st);
        tezzeret_guard_table_close(table);
        tezzeret_guard_table_close(std::ptr::null_mut());
        let nowhere = CString::new(dir.path().join("none.tbl").to_str().unwrap()).unwrap();
        let st = tezzeret_guard_table_open(nowhere.as_ptr(), &mut table);
        assert_eq!(tezzeret_status_code(st), TEZZERET_CODE_IO);
        tezzeret_status_free(st);
        std::fs::write(dir.path().join("junk.tbl"), b"not a guard table at all, not even close").unwrap();
        let junk = CString::new(dir.path().join("junk.tbl").to_str().unwrap()).unwrap();
        let st = tezzeret_guard_table_open(junk.as_ptr(), &mut table);
        assert_eq!(tezzeret_status_code(st), TEZZERET_CODE_CORRUPT);
        tezzeret_status_free(st);
    }
}

/// Child roles, run by re-executing this test binary.
const ROLE: &str = "TEZZERET_GUARD_TEST_ROLE";
const TABLE: &str = "TEZZERET_GUARD_TEST_TABLE";

/// Beside the table: the reader stops once `stop` exists, and appends one
/// byte to `refusals` at the start of every run of refused reads.
fn stop_file(table: &Path) -> std::path::PathBuf {
    table.with_extension("stop")
}

fn refusals_file(table: &Path) -> std::path::PathBuf {
    table.with_extension("refusals")
}

#[test]
#[ignore = "child process of guard_reader_never_accepts_a_torn_slot"]
fn guard_child() {
    let Ok(role) = std::env::var(ROLE) else { return };
    let path = std::path::PathBuf::from(std::env::var(TABLE).unwrap());
    match role.as_str() {
        "writer" => {
            let table = GuardTable::open_writable(&path, 16).unwrap();
            let (a, b) = (entry("BPX", 1), entry("BPX", 2));
            {
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                writeln!(out, "ready").unwrap();
                out.flush().unwrap();
            }
            loop {
                table.put(&a).unwrap();
                table.put(&b).unwrap();
            }
        }
        "grower" => {
            // Puts until its table grows (killed by a failpoint inside).
            let table = GuardTable::open_writable(&path, 4).unwrap();
            for i in 0..20 {
                table.put(&entry(&format!("BP-grown-{i}"), 2)).unwrap();
            }
        }
        "reader" => {
            use std::io::Write;
            let table = GuardTable::open_read_only(&path).unwrap();
            {
                let mut out = std::io::stdout().lock();
                writeln!(out, "ready").unwrap();
                out.flush().unwrap();
            }
            let (a, b) = (entry("BPX", 1), entry("BPX", 2));
            let (mut seen_a, mut seen_b, mut refused) = (0u64, 0u64, 0u64);
            let mut refusals = std::fs::OpenOptions::new().create(true).append(true).open(refusals_file(&path)).unwrap();
            let mut in_refusal = false;
            for i in 0u64.. {
                if i % 256 == 0 && stop_file(&path).exists() {
                    break;
                }
                match table.lookup("BPX") {
                    Ok(Lookup::Found(e)) if e == a => (seen_a, in_refusal) = (seen_a + 1, false),
                    Ok(Lookup::Found(e)) if e == b => (seen_b, in_refusal) = (seen_b + 1, false),
                    Ok(other) => {
                        println!("TORN ACCEPTED {other:?}");
                        std::process::exit(3);
                    }
                    Err(_) => {
                        refused += 1;
                        if !in_refusal {
                            refusals.write_all(b"r").unwrap();
                            in_refusal = true;
                        }
                    }
                }
            }
            println!("reader a={seen_a} b={seen_b} refused={refused}");
        }
        _ => {}
    }
}

fn child(role: &str, table: &Path, failpoints: Option<String>) -> std::process::Child {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args(["--exact", "guards::guard_child", "--ignored", "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .env(TABLE, table)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(failpoints) = failpoints {
        command.env("TEZZERET_FAILPOINTS", failpoints);
    }
    command.spawn().unwrap()
}

/// Waits for a writer's `ready` line (the table is open, writes begin).
fn wait_ready(writer: &mut std::process::Child) {
    use std::io::BufRead;
    let stdout = writer.stdout.as_mut().unwrap();
    let mut lines = std::io::BufReader::new(stdout).lines();
    while let Some(line) = lines.next() {
        if line.unwrap().contains("ready") {
            return;
        }
    }
    panic!("the writer ended before it was ready");
}

#[test]
fn guard_reader_never_accepts_a_torn_slot() {
    let dir = TempDir::new("guards-race");
    let path = dir.path().join("guards.tbl");
    GuardTable::create(&path, 16).unwrap().put(&entry("BPX", 1)).unwrap();
    let mut reader = child("reader", &path, None);
    wait_ready(&mut reader);
    let mut rng = crate::Rng(0x9e37_79b9_7f4a_7c15);
    let mut torn_rounds = 0;
    for round in 0..12u64 {
        if round % 2 == 0 {
            // Killed inside a slot update, at a random one of its writes:
            // the slot is left mid-update, and must be refused until repaired.
            let refused_before = std::fs::metadata(refusals_file(&path)).map_or(0, |m| m.len());
            let at = 1 + rng.below(40);
            let mut writer = child("writer", &path, Some(format!("guard.write=crash@{at}")));
            writer.wait().unwrap();
            let table = GuardTable::open_read_only(&path).unwrap();
            assert!(table.lookup("BPX").is_err(), "a slot left mid-update reads as an error, never as data");
            crate::wait_for("the reader to refuse the slot left mid-update", || {
                std::fs::metadata(refusals_file(&path)).map_or(0, |m| m.len()) > refused_before
            });
            torn_rounds += 1;
        } else {
            // Killed at a random instant after it began writing.
            let mut writer = child("writer", &path, None);
            wait_ready(&mut writer);
            std::thread::sleep(Duration::from_micros(rng.below(20_000)));
            writer.kill().unwrap();
            writer.wait().unwrap();
        }
    }
    // A last writer repairs the slot, so that both versions are seen again.
    let mut writer = child("writer", &path, None);
    wait_ready(&mut writer);
    std::thread::sleep(Duration::from_millis(20));
    writer.kill().unwrap();
    writer.wait().unwrap();
    std::fs::write(stop_file(&path), b"").unwrap();
    let out = reader.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "reader failed: {text}");
    let counts: Vec<u64> = text
        .lines()
        .find_map(|l| l.find("reader a=").map(|i| &l[i..]))
        .unwrap_or_else(|| panic!("no reader summary in {text}"))
        .split_whitespace()
        .skip(1)
        .map(|kv| kv.split('=').nth(1).unwrap().parse().unwrap())
        .collect();
    assert!(counts[0] > 0 && counts[1] > 0, "the reader saw both versions: {text}");
    assert!(counts[2] > 0, "torn slots were met and refused: {text}");
    assert_eq!(torn_rounds, 6);
}

#[test]
fn a_writer_killed_while_replacing_its_table_strands_no_reader() {
    let dir = TempDir::new("guards-replace-killed");
    let path = dir.path().join("guards.tbl");
    GuardTable::create(&path, 4).unwrap().put(&entry("BP-first", 1)).unwrap();
    let early = GuardTable::open_read_only(&path).unwrap();
    // Killed after its grown table is in place, before the old one (the
    // one `early` reads) is marked superseded.
    let status = child("grower", &path, Some("guard.supersede=crash@1".into())).wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL), "killed inside the replacement");
    // The next writer (a forge reopening) marks it: the early reader moves
    // to the table in place and sees what is written there from now on.
    let writer = GuardTable::open_writable(&path, 4).unwrap();
    writer.put(&entry("BP-after", 3)).unwrap();
    assert_eq!(early.lookup("BP-after").unwrap(), Lookup::Found(entry("BP-after", 3)));
    assert_eq!(early.lookup("BP-first").unwrap(), Lookup::Found(entry("BP-first", 1)));
    assert!(!path.with_extension("old").exists(), "the old table's second name is gone");
}

#[test]
fn a_table_grows_past_its_slots_and_readers_follow() {
    let dir = TempDir::new("guards-grow");
    let path = dir.path().join("guards.tbl");
    let writer = GuardTable::create(&path, 4).unwrap();
    writer.put(&entry("BP-first", 1)).unwrap();
    // A reader opened before any growth, and one opened after.
    let early = GuardTable::open_read_only(&path).unwrap();
    for i in 0..5000 {
        writer.put(&entry(&format!("BP{i}"), (i % 7) as u8)).unwrap();
    }
    assert!(writer.slots() >= 5001 * 4 / 3, "{} slots for 5001 entries", writer.slots());
    let late = GuardTable::open_read_only(&path).unwrap();
    for reader in [&early, &late] {
        assert_eq!(reader.slots(), writer.slots(), "readers follow the table to its newest file");
        for i in (0..5000).step_by(7) {
            assert_eq!(reader.lookup(&format!("BP{i}")).unwrap(), Lookup::Found(entry(&format!("BP{i}"), (i % 7) as u8)));
        }
        assert_eq!(reader.lookup("BP-first").unwrap(), Lookup::Found(entry("BP-first", 1)));
        assert_eq!(reader.entries(), (writer.entries().0, 0));
    }
    // Removals and replacements after growth are seen too.
    writer.remove("BP7").unwrap();
    writer.put(&entry("BP14", 3)).unwrap();
    assert_eq!(early.lookup("BP7").unwrap(), Lookup::Missing);
    assert_eq!(early.lookup("BP14").unwrap(), Lookup::Found(entry("BP14", 3)));
    // The table reopens as it was left.
    drop(writer);
    let reopened = GuardTable::open_writable(&path, 4).unwrap();
    assert_eq!(reopened.entries().0.len(), 5000);
}

#[test]
fn entries_written_together_grow_the_table_as_needed_and_all_reopen() {
    let dir = TempDir::new("guards-put-all");
    let path = dir.path().join("guards.tbl");
    let writer = GuardTable::create(&path, 4).unwrap();
    writer.put(&entry("BP3", 1)).unwrap();
    let reader = GuardTable::open_read_only(&path).unwrap();
    // BP3 is replaced within the batch, after the table grew under it.
    let batch: Vec<GuardEntry> = (0..100).map(|i| entry(&format!("BP{i}"), (i % 5) as u8)).collect();
    writer.put_all(&batch).unwrap();
    assert!(writer.slots() >= 100 * 4 / 3, "{} slots for 100 entries", writer.slots());
    for e in &batch {
        assert_eq!(reader.lookup(&e.blueprint_id).unwrap(), Lookup::Found(e.clone()));
    }
    writer.put_all(&[]).unwrap();
    drop(writer);
    let reopened = GuardTable::open_writable(&path, 4).unwrap();
    let (entries, damaged) = reopened.entries();
    assert_eq!((entries.len(), damaged), (100, 0));
    assert_eq!(reopened.lookup("BP3").unwrap(), Lookup::Found(entry("BP3", 3)));
}

#[test]
fn a_reader_in_another_process_follows_a_growing_table_and_never_loses_an_entry() {
    let dir = TempDir::new("guards-grow-race");
    let path = dir.path().join("guards.tbl");
    let writer = GuardTable::create(&path, 4).unwrap();
    writer.put(&entry("BPX", 1)).unwrap();
    let mut reader = child("reader", &path, None);
    wait_ready(&mut reader);
    // Grow from 4 slots to thousands while BPX flips between its two
    // versions: the reader must find BPX, in one version or the other, at
    // every read, across every replacement of the file.
    let initial = writer.slots();
    for i in 0..3000 {
        writer.put(&entry(&format!("BP{i}"), 0)).unwrap();
        if i % 10 == 0 {
            writer.put(&entry("BPX", if i % 20 == 0 { 2 } else { 1 })).unwrap();
        }
    }
    assert!(writer.slots() >= 1024 * initial, "the table grew: {} slots", writer.slots());
    std::fs::write(stop_file(&path), b"").unwrap();
    let out = reader.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "reader failed (a torn slot accepted, or an entry missing): {text}");
    assert!(text.contains("reader a=") && !text.contains(" a=0 ") && !text.contains(" b=0 "), "the reader saw both versions: {text}");
}

#[test]
fn a_forge_grows_its_guard_table_as_blueprints_come() {
    use tezzeret::forge::{DevicePreference, Forge, ForgeConfig};
    let dir = TempDir::new("guards-forge-grow");
    let names = ["relu_activation", "gelu_activation", "skip_connection", "layer_scaling", "dropout_light", "linear_projection"];
    let catalog: Vec<String> = (0..12).map(|i| format!(r#"{{"blueprint_id": "G{i}", "name": "{}", "tier": "SAFE"}}"#, names[i % names.len()])).collect();
    let catalog = tezzeret::build::catalog::Catalog::from_json(&format!("[{}]", catalog.join(","))).unwrap();
    let mut config = ForgeConfig::new(dir.path());
    config.device = DevicePreference::Cpu;
    config.strategy = tezzeret::build::compile::Strategy::Fast;
    config.guard_slots = 2;
    let mut forge = Forge::open(config.clone(), Box::new(crate::FixedCatalog(catalog.clone()))).unwrap();
    forge.compile_one("G0").unwrap();
    let reader = GuardTable::open_read_only(&dir.path().join("guards.tbl")).unwrap();
    let reports = forge.run(&mut |_| {});
    assert!(reports.iter().all(|r| r.error.is_none()), "{reports:?}");
    assert!(forge.guards().slots() >= 16, "{} slots for 12 blueprints", forge.guards().slots());
    for i in 0..12 {
        assert!(matches!(reader.lookup(&format!("G{i}")).unwrap(), Lookup::Found(_)), "G{i} seen by a reader opened early");
    }
    drop(forge);
    assert!(tezzeret::state::verify::verify_state(dir.path()).unwrap().problems.is_empty());
    // Reopened with the small initial size: the grown table is kept, nothing to repair.
    let forge = Forge::open(config, Box::new(crate::FixedCatalog(catalog))).unwrap();
    assert_eq!(forge.guards().entries().0.len(), 12);
}

/// Writes the fuzz seed corpus (`fuzz/seeds/`): a small valid WAL and a
/// small guard table. Run by scripts/fuzz.sh when the seeds are missing.
#[test]
#[ignore = "writes fuzz seeds; run by scripts/fuzz.sh"]
fn write_fuzz_seeds() {
    let seeds = crate::repo_root().join("fuzz/seeds");
    let dir = TempDir::new("seeds");
    let wal_path = dir.path().join("wal.log");
    {
        let mut journal = tezzeret::state::wal::Journal::open(&wal_path).unwrap();
        journal.submit(vec![]).unwrap();
        let (mut wal, _) = tezzeret::state::wal::Wal::open(&dir.path().join("raw.log")).unwrap();
        wal.commit(&[vec![b"{\"record\":\"fail\",\"seq\":1,\"reason\":\"r\",\"message\":\"m\"}".to_vec()], vec![]]).unwrap();
        drop(journal);
        let end = tezzeret::state::wal::log::read_only(&dir.path().join("raw.log")).unwrap().end as usize;
        std::fs::create_dir_all(seeds.join("wal_recovery")).unwrap();
        std::fs::write(seeds.join("wal_recovery/two-transactions"), &std::fs::read(dir.path().join("raw.log")).unwrap()[..end]).unwrap();
    }
    let table_path = dir.path().join("guards.tbl");
    let table = GuardTable::create(&table_path, 2).unwrap();
    table.put(&entry("BP001", 1)).unwrap();
    std::fs::create_dir_all(seeds.join("guard_table_reader")).unwrap();
    std::fs::copy(&table_path, seeds.join("guard_table_reader/one-entry")).unwrap();
}
