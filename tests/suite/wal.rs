//! The WAL file format and recovery: round trips, torn
//! tails at every byte, bit flips in every header field, stale epochs,
//! mid-log corruption, idempotent recovery, checkpoints.
use std::path::Path;

use tezzeret::state::wal::format::HEADER_SIZE;
use tezzeret::state::wal::journal::{replay, Job, Journal, Record};
use tezzeret::state::wal::{Recovery, Wal};
use tezzeret::base::leyline::MessagePriority;
use tezzeret::ErrorCode;

use crate::TempDir;

fn tx(i: usize) -> Vec<Vec<u8>> {
    vec![format!("record {i} a").into_bytes(), vec![i as u8; i % 17]]
}

/// Writes `n` transactions, `per_batch` per sync batch.
fn write_log(path: &Path, n: usize, per_batch: usize) {
    let (mut wal, _) = Wal::open(path).unwrap();
    for chunk in (0..n).collect::<Vec<_>>().chunks(per_batch) {
        let txs: Vec<Vec<Vec<u8>>> = chunk.iter().map(|i| tx(*i)).collect();
        wal.commit(&txs).unwrap();
    }
}

fn committed(recovery: &Recovery) -> Vec<Vec<Vec<u8>>> {
    recovery.transactions.iter().map(|t| t.records.clone()).collect()
}

#[test]
fn transactions_round_trip_and_epochs_advance() {
    let dir = TempDir::new("wal-rt");
    let path = dir.path().join("wal.log");
    write_log(&path, 25, 4);
    let (wal, recovery) = Wal::open(&path).unwrap();
    assert_eq!(committed(&recovery), (0..25).map(tx).collect::<Vec<_>>());
    assert_eq!(recovery.torn_bytes, 0);
    assert_eq!(recovery.epoch, 1);
    assert_eq!(wal.epoch(), 2);
    drop(wal);
    let (mut wal, _) = Wal::open(&path).unwrap();
    wal.commit(&[]).unwrap(); // nothing to write: a no-op, not an error
    wal.commit(&[tx(99)]).unwrap();
    drop(wal);
    let (_, recovery) = Wal::open(&path).unwrap();
    assert_eq!(recovery.transactions.len(), 26);
    // Epochs count opens that wrote: the second open wrote nothing.
    assert_eq!(recovery.transactions[25].epoch, 2);
}

#[test]
fn truncation_at_every_byte_of_the_last_three_entries_recovers_a_prefix() {
    let dir = TempDir::new("wal-trunc");
    let path = dir.path().join("wal.log");
    write_log(&path, 6, 1);
    let full = tezzeret::state::wal::log::read_only(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let entries = &full.entries;
    let from = entries[entries.len() - 3].offset as usize;
    let end = full.end as usize;
    let copy = dir.path().join("cut.log");
    for cut in from..=end {
        std::fs::write(&copy, &bytes[..cut]).unwrap();
        let (mut wal, recovery) = Wal::open(&copy).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        // A transaction survives iff its COMMIT entry lies wholly before the cut.
        let expected = if cut >= end { 6 } else { 5 };
        assert_eq!(recovery.transactions.len(), expected, "cut at {cut}");
        assert_eq!(committed(&recovery), (0..expected).map(tx).collect::<Vec<_>>());
        // Appending after a torn tail works, and recovering again is stable.
        wal.commit(&[tx(42)]).unwrap();
        drop(wal);
        let (_, again) = Wal::open(&copy).unwrap();
        assert_eq!(again.transactions.len(), expected + 1, "cut at {cut}");
        assert_eq!(again.transactions[expected].records, tx(42));
        assert_eq!(again.torn_bytes, 0);
    }
}

#[test]
fn every_header_bit_flip_is_dropped_at_the_tail_and_refused_mid_log() {
    let dir = TempDir::new("wal-flip");
    let path = dir.path().join("wal.log");
    write_log(&path, 8, 1);
    let full = tezzeret::state::wal::log::read_only(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let copy = dir.path().join("flip.log");
    let last = full.entries.last().unwrap().offset as usize;
    let middle = full.entries[full.entries.len() / 2].offset as usize;
    for byte in 0..HEADER_SIZE {
        for bit in [0u8, 5] {
            // In the last entry (the last COMMIT): a torn tail, the last transaction dropped.
            let mut damaged = bytes.clone();
            damaged[last + byte] ^= 1 << bit;
            std::fs::write(&copy, &damaged).unwrap();
            let recovery = Wal::open(&copy).map(|(_, r)| r).unwrap_or_else(|e| panic!("byte {byte}: {e}"));
            assert_eq!(committed(&recovery), (0..7).map(tx).collect::<Vec<_>>(), "tail byte {byte} bit {bit}");
            // Mid-log, with synced batches after it: an explicit error, never skipped.
            let mut damaged = bytes.clone();
            damaged[middle + byte] ^= 1 << bit;
            std::fs::write(&copy, &damaged).unwrap();
            let err = Wal::open(&copy).err().unwrap_or_else(|| panic!("mid-log byte {byte} bit {bit} accepted"));
            assert_eq!(err.code(), ErrorCode::Corrupt, "{err}");
            assert!(err.message().contains("WAL corrupt"), "{err}");
            // Read-only recovery reports the same, and changes nothing.
            assert!(tezzeret::state::wal::log::read_only(&copy).is_err());
            assert_eq!(std::fs::read(&copy).unwrap(), damaged);
        }
    }
}

#[test]
fn a_zeroed_header_with_later_synced_batches_is_refused_not_taken_for_the_end() {
    let dir = TempDir::new("wal-zeroed");
    let path = dir.path().join("wal.log");
    write_log(&path, 6, 2);
    let full = tezzeret::state::wal::log::read_only(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let copy = dir.path().join("zeroed.log");
    // The first header of the second sync batch zeroed (a lost page): the
    // third batch after it was synced, so this is damage, not the log's end.
    let second = full.entries.iter().find(|e| e.header.batch > full.entries[0].header.batch).unwrap().offset as usize;
    let mut damaged = bytes.clone();
    damaged[second..second + HEADER_SIZE].fill(0);
    std::fs::write(&copy, &damaged).unwrap();
    let err = Wal::open(&copy).err().expect("a zeroed header before synced batches is refused");
    assert_eq!(err.code(), ErrorCode::Corrupt, "{err}");
    assert!(err.message().contains("zeroed header"), "{err}");
    assert_eq!(std::fs::read(&copy).unwrap(), damaged, "nothing was wiped");
    // The last batch's first header zeroed: nothing follows, the tail is torn.
    let last_batch = full.entries.last().unwrap().header.batch;
    let last = full.entries.iter().find(|e| e.header.batch == last_batch).unwrap().offset as usize;
    let mut damaged = bytes.clone();
    damaged[last..last + HEADER_SIZE].fill(0);
    std::fs::write(&copy, &damaged).unwrap();
    let (_, recovery) = Wal::open(&copy).unwrap();
    assert_eq!(committed(&recovery), (0..4).map(tx).collect::<Vec<_>>());
}

#[test]
fn damaged_payloads_and_huge_sizes_never_pass() {
    let dir = TempDir::new("wal-payload");
    let path = dir.path().join("wal.log");
    write_log(&path, 5, 1);
    let full = tezzeret::state::wal::log::read_only(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let copy = dir.path().join("p.log");
    // A payload byte of the last DATA entry: its transaction is dropped.
    let data = full.entries.iter().rev().find(|e| e.header.payload_size > 0 && e.header.entry_type == tezzeret::state::wal::format::EntryType::Data).unwrap();
    let mut damaged = bytes.clone();
    damaged[data.offset as usize + HEADER_SIZE] ^= 0x40;
    std::fs::write(&copy, &damaged).unwrap();
    let (_, recovery) = Wal::open(&copy).unwrap();
    assert_eq!(recovery.transactions.len(), 4);
    // A header claiming a huge payload (with a valid CRC) is bounded before use.
    let mut header = full.entries.last().unwrap().header.clone();
    header.payload_size = u64::MAX / 2;
    header.next_offset = 0;
    let (encoded, _) = header.encode();
    let mut damaged = bytes.clone();
    let at = full.end as usize;
    damaged.resize(at + HEADER_SIZE * 4, 0);
    damaged[at..at + HEADER_SIZE].copy_from_slice(&encoded);
    std::fs::write(&copy, &damaged).unwrap();
    let (_, recovery) = Wal::open(&copy).unwrap();
    assert_eq!(recovery.transactions.len(), 5);
    assert!(recovery.torn_reason.unwrap().contains("exceeds"));
}

#[test]
fn an_entry_from_an_older_epoch_is_never_applied() {
    let dir = TempDir::new("wal-epoch");
    let path = dir.path().join("wal.log");
    write_log(&path, 3, 1);
    {
        let (mut wal, _) = Wal::open(&path).unwrap(); // epoch 2
        wal.commit(&[tx(3)]).unwrap();
    }
    let full = tezzeret::state::wal::log::read_only(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    // Re-append a copy of an epoch-1 transaction (BEGIN/DATA/COMMIT) after
    // the epoch-2 one, with sequence numbers and the chain made to fit.
    let mut forged = bytes[..full.end as usize].to_vec();
    let last_crc = u32::from_le_bytes(bytes[full.entries.last().unwrap().offset as usize + 108..][..4].try_into().unwrap());
    let mut prev = last_crc;
    let mut seq = full.last_sequence;
    let mut offset = full.end;
    for e in &full.entries[3..6] {
        let mut h = e.header.clone();
        assert_eq!(h.epoch, 1);
        seq += 1;
        h.sequence = seq;
        h.prev_header_crc = prev;
        h.next_offset = tezzeret::state::wal::format::next_offset(offset, h.payload_size);
        h.batch = full.last_batch + 1;
        let (encoded, crc) = h.encode();
        prev = crc;
        forged.extend_from_slice(&encoded);
        let start = e.offset as usize + HEADER_SIZE;
        forged.extend_from_slice(&bytes[start..start + h.payload_size as usize]);
        forged.resize(h.next_offset as usize, 0);
        offset = h.next_offset;
    }
    std::fs::write(&path, &forged).unwrap();
    let (_, recovery) = Wal::open(&path).unwrap();
    assert_eq!(recovery.transactions.len(), 4, "the stale epoch-1 entries are not applied");
    assert!(recovery.torn_reason.unwrap().contains("older epoch"));
}

#[test]
fn recovering_twice_changes_nothing() {
    let dir = TempDir::new("wal-twice");
    let path = dir.path().join("wal.log");
    write_log(&path, 10, 3);
    let bytes = std::fs::read(&path).unwrap();
    let end = tezzeret::state::wal::log::read_only(&path).unwrap().end as usize;
    std::fs::write(&path, &bytes[..end - 100]).unwrap(); // a torn tail
    let first = Wal::open(&path).map(|(_, r)| committed(&r)).unwrap();
    let after_first = std::fs::read(&path).unwrap();
    let second = Wal::open(&path).map(|(_, r)| committed(&r)).unwrap();
    assert_eq!(first, second);
    assert_eq!(std::fs::read(&path).unwrap(), after_first, "the second recovery writes nothing");
}

fn job(id: &str, priority: i32) -> Job {
    let mut job = crate::measure::sample_job(0);
    job.priority = MessagePriority::try_from(priority).unwrap();
    job.blueprint_id = id.into();
    job.cache_key = format!("key-{id}");
    job
}

#[test]
fn queue_order_is_priority_then_fifo_and_survives_reopen() {
    let dir = TempDir::new("wal-queue");
    let path = dir.path().join("wal.log");
    // A pseudo-random sequence of submissions and reopenings.
    let mut expected: Vec<(i32, u64, String)> = Vec::new();
    let mut rng = crate::Rng(0x2545_f491_4f6c_dd1d);
    let mut next = || rng.below(u64::MAX);
    for round in 0..20 {
        let mut journal = Journal::open(&path).unwrap();
        let batch: Vec<Job> = (0..(next() % 5 + 1)).map(|i| job(&format!("BP{round}-{i}"), (next() % 4 + 1) as i32)).collect();
        let seqs = journal.submit(batch.clone()).unwrap();
        for (j, seq) in batch.iter().zip(seqs) {
            expected.push((j.priority as i32, seq, j.blueprint_id.clone()));
        }
        // Sometimes finish the head of the queue.
        if next() % 3 == 0 {
            let head = journal.state().queue()[0].clone();
            journal.append(vec![vec![Record::Fail { seq: head.seq, reason: "test".into(), message: String::new() }]]).unwrap();
            let pos = expected.iter().position(|e| e.1 == head.seq).unwrap();
            expected.remove(pos);
        }
    }
    expected.sort_by_key(|(p, s, _)| (std::cmp::Reverse(*p), *s));
    let journal = Journal::open(&path).unwrap();
    let order: Vec<String> = journal.state().queue().iter().map(|j| j.blueprint_id.clone()).collect();
    assert_eq!(order, expected.into_iter().map(|e| e.2).collect::<Vec<_>>());
}

#[test]
fn checkpoints_keep_the_log_bounded() {
    let dir = TempDir::new("wal-checkpoint");
    let path = dir.path().join("wal.log");
    let mut journal = Journal::open(&path).unwrap();
    journal.set_checkpoint_every(500);
    let mut longest = 0;
    for i in 0..3000 {
        let seq = journal.submit(vec![job(&format!("BP{}", i % 50), 2)]).unwrap()[0];
        journal.append(vec![vec![Record::Fail { seq, reason: "r".into(), message: String::new() }]]).unwrap();
        longest = longest.max(journal.wal().len());
    }
    let state = journal.state().clone();
    drop(journal);
    assert!(longest < 2 << 20, "log grew to {longest} bytes");
    let recovered = replay(&tezzeret::state::wal::log::read_only(&path).unwrap()).unwrap();
    assert_eq!(recovered.failures, state.failures);
    assert_eq!(recovered.next_seq, state.next_seq);
    assert!(recovered.pending.is_empty());
}

#[test]
fn a_large_state_checkpoints_in_parts_and_recovers_whole() {
    let dir = TempDir::new("wal-checkpoint-parts");
    let path = dir.path().join("wal.log");
    let mut journal = Journal::open(&path).unwrap();
    journal.set_checkpoint_every(u64::MAX);
    // 5000 queued jobs: a snapshot of them is split into several records.
    for chunk in (0..5000).collect::<Vec<_>>().chunks(500) {
        journal.submit(chunk.iter().map(|i| job(&format!("BP{i}"), 1 + (*i % 4) as i32)).collect()).unwrap();
    }
    let before = journal.state().clone();
    journal.checkpoint().unwrap();
    drop(journal);
    let recovery = tezzeret::state::wal::log::read_only(&path).unwrap();
    assert_eq!(recovery.transactions.len(), 1, "one checkpoint transaction");
    assert!(recovery.transactions[0].records.len() >= 3, "the snapshot is split: {} records", recovery.transactions[0].records.len());
    assert!(recovery.transactions[0].records.iter().all(|r| r.len() < 8 << 20), "every part is small");
    let mut reopened = Journal::open(&path).unwrap();
    assert_eq!(reopened.state().pending, before.pending, "every queued job is back");
    assert_eq!(reopened.state().queue().len(), 5000);
    // The queue index is rebuilt too: a finished job leaves it.
    let first = reopened.state().queue()[0].clone();
    assert_eq!(reopened.state().queued_with_key(&first.cache_key), Some(first.seq));
    reopened.append(vec![vec![Record::Fail { seq: first.seq, reason: "r".into(), message: String::new() }]]).unwrap();
    assert_eq!(reopened.state().queued_with_key(&first.cache_key), None);
}

#[test]
fn a_record_recovery_would_refuse_is_never_written() {
    let dir = TempDir::new("wal-too-big");
    let (mut wal, _) = Wal::open(&dir.path().join("wal.log")).unwrap();
    let huge = vec![b'x'; (tezzeret::state::wal::format::MAX_PAYLOAD + 1) as usize];
    let err = wal.commit(&[vec![huge]]).unwrap_err();
    assert!(err.message().contains("exceeds"), "{err}");
    assert!(wal.is_empty(), "nothing was written");
    wal.commit(&[vec![b"small".to_vec()]]).unwrap();
}

/// Property: whatever the submissions (random priorities, several per
/// batch), priority changes, completions and restarts, the queue read back
/// after every reopen runs by priority (higher first), then in submission
/// order.
#[test]
fn queue_order_survives_random_submissions_reprioritisations_completions_and_restarts() {
    for seed in 1..=12u64 {
        let dir = TempDir::new("queue-property");
        let path = dir.path().join("commit.log");
        let mut rng = crate::Rng(0x2545_f491_4f6c_dd1d ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        // The model: (priority, seq) of every pending job.
        let mut model: Vec<(i32, u64)> = Vec::new();
        let mut journal = Journal::open(&path).unwrap();
        journal.set_checkpoint_every(1 + rng.below(40)); // checkpoints at random distances too
        for step in 0..150 {
            match rng.below(10) {
                0 => {
                    drop(journal);
                    journal = Journal::open(&path).unwrap();
                    journal.set_checkpoint_every(1 + rng.below(40));
                    let queue: Vec<(i32, u64)> = journal.state().queue().iter().map(|j| (j.priority as i32, j.seq)).collect();
                    let mut expected = model.clone();
                    expected.sort_by_key(|(p, s)| (std::cmp::Reverse(*p), *s));
                    assert_eq!(queue, expected, "seed {seed}, step {step}: queue after a restart");
                }
                1 | 2 if !model.is_empty() => {
                    // The head runs and ends (commit-less failure is enough to leave the queue).
                    let head = journal.state().queue()[0].seq;
                    let records = vec![Record::Start { seq: head }, Record::Fail { seq: head, reason: "test".into(), message: String::new() }];
                    journal.append(vec![records]).unwrap();
                    model.retain(|(_, s)| *s != head);
                }
                3 if !model.is_empty() => {
                    // Submitted again at another priority: same place in submission order.
                    let i = rng.below(model.len() as u64) as usize;
                    let priority = 1 + rng.below(4) as i32;
                    let typed = MessagePriority::try_from(priority).unwrap();
                    journal.append(vec![vec![Record::Reprioritize { seq: model[i].1, priority: typed }]]).unwrap();
                    model[i].0 = priority;
                }
                _ => {
                    let jobs: Vec<Job> = (0..1 + rng.below(3))
                        .map(|_| {
                            let mut job = crate::measure::sample_job(rng.below(1000));
                            job.priority = MessagePriority::try_from(1 + rng.below(4) as i32).unwrap();
                            job
                        })
                        .collect();
                    let priorities: Vec<i32> = jobs.iter().map(|j| j.priority as i32).collect();
                    let seqs = journal.submit(jobs).unwrap();
                    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "sequence numbers grow");
                    assert!(model.iter().all(|(_, s)| *s < seqs[0]), "and never repeat, across restarts too");
                    model.extend(priorities.into_iter().zip(seqs));
                }
            }
        }
    }
}

#[test]
fn the_outbox_survives_checkpoints_in_parts_and_leaves_once_published() {
    use tezzeret::base::leyline::KernelCatalogUpdate;
    use tezzeret::state::wal::journal::Announcement;
    let dir = TempDir::new("wal-outbox");
    let path = dir.path().join("journal.wal");
    let announce = |seq: u64| Record::Announce {
        announcement: Announcement {
            seq,
            message_id: format!("kcu-test-{seq}"),
            update: KernelCatalogUpdate { blueprint_id: format!("BP{seq:05}"), checksum: "ab".repeat(32), ..Default::default() },
        },
    };
    {
        let mut journal = Journal::open(&path).unwrap();
        // More entries than one checkpoint part holds, then a checkpoint.
        journal.append((0..5000).map(|i| vec![announce(i)]).collect()).unwrap();
        journal.append(vec![vec![Record::Published { seqs: (0..10).collect() }]]).unwrap();
        journal.checkpoint().unwrap();
    }
    let journal = Journal::open(&path).unwrap();
    let state = journal.state();
    assert_eq!(state.outbox.len(), 4990);
    assert_eq!(state.outbox.keys().next(), Some(&10));
    assert_eq!(state.outbox[&4999].update.blueprint_id, "BP04999");
    assert_eq!(state.next_announcement, 5000);
    // The checkpoint's first record holds no outbox: it came in parts.
    let first = &journal.recovery().transactions[0].records[0];
    let head: serde_json::Value = serde_json::from_slice(first).unwrap();
    assert_eq!(head["state"]["outbox"].as_array().map(Vec::len), Some(0));
}

#[test]
fn shared_cache_keys_survive_checkpoints_in_parts_and_leave_with_eviction() {
    let dir = TempDir::new("wal-shared");
    let path = dir.path().join("journal.wal");
    use tezzeret::state::wal::journal::SharedArtifact;
    let key = |i: u64| format!("{i:064x}");
    let entry = |i: u64| SharedArtifact { cache_key: key(i), checksum: "ab".repeat(32) };
    {
        let mut journal = Journal::open(&path).unwrap();
        // More keys than one checkpoint part holds, then a checkpoint.
        journal.append(vec![vec![Record::Shared { artifacts: (0..5000).map(entry).collect(), root: Some("aws s3://fleet/".into()) }]]).unwrap();
        journal.append(vec![vec![Record::Evict { blueprint_id: None, cache_key: key(7) }]]).unwrap();
        journal.checkpoint().unwrap();
    }
    let journal = Journal::open(&path).unwrap();
    let shared = &journal.state().shared;
    assert_eq!(shared.len(), 4999);
    assert!(shared.contains(&entry(4999)) && !shared.contains(&entry(7)), "an evicted key is no longer shared");
    let first = &journal.recovery().transactions[0].records[0];
    let head: serde_json::Value = serde_json::from_slice(first).unwrap();
    assert_eq!(head["state"]["shared"].as_array().map(Vec::len), Some(0), "the keys came in parts");
    let state = journal.state();
    assert!(state.is_shared_at("aws s3://fleet/", &entry(1)), "the checkpoint kept the store they are shared in");
    assert!(!state.is_shared_at("aws s3://fleet/other/", &entry(1)), "shared in one prefix is not shared in another");
}

#[test]
fn artifacts_shared_in_another_store_replace_those_of_the_last() {
    let dir = TempDir::new("wal-shared-root");
    let path = dir.path().join("journal.wal");
    use tezzeret::state::wal::journal::SharedArtifact;
    let entry = |i: u64| SharedArtifact { cache_key: format!("{i:064x}"), checksum: "cd".repeat(32) };
    let shared = |artifacts: Vec<SharedArtifact>, root: &str| vec![vec![Record::Shared { artifacts, root: Some(root.into()) }]];
    let (first, second) = ("http://127.0.0.1:8333 s3://fleet/run-41/", "http://127.0.0.1:8333 s3://fleet/run-42/");
    {
        let mut journal = Journal::open(&path).unwrap();
        journal.append(shared((0..3).map(entry).collect(), first)).unwrap();
        journal.append(shared(vec![entry(0)], second)).unwrap();
        journal.append(shared(vec![entry(9)], second)).unwrap();
    }
    let journal = Journal::open(&path).unwrap();
    let state = journal.state();
    assert_eq!(state.shared_root.as_deref(), Some(second));
    assert_eq!(state.shared.iter().cloned().collect::<Vec<_>>(), vec![entry(0), entry(9)], "only what the second store holds");
    assert!(!state.is_shared_at(first, &entry(1)));
}
