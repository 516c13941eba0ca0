//! Fuzzes WAL recovery: any bytes as a log image must give a recovered
//! prefix or an explicit error, never a panic or an out-of-bounds read;
//! and recovering what was kept must give the same transactions.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(recovery) = tezzeret::state::wal::log::scan(data) {
        let kept = &data[..recovery.end as usize];
        let again = tezzeret::state::wal::log::scan(kept).expect("a recovered prefix recovers");
        assert_eq!(again.transactions, recovery.transactions);
        let _ = tezzeret::state::wal::journal::replay(&recovery);
    }
});
