//! Tests of the durable storage: round trips, torn tails, corruption,
//! truncation, compaction, snapshots and simulated crashes.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use tempfile::TempDir;

use super::*;
use crate::raft::{Config, EntryPayload, Raft, SplitMix64};

// ---- helpers -------------------------------------------------------------

fn ent(index: Index, term: Term) -> Entry {
    Entry {
        term,
        index,
        payload: EntryPayload::Normal(format!("entry {index} of term {term}").into_bytes().into()),
    }
}

fn ents(lo: Index, hi: Index, term: Term) -> Vec<Entry> {
    (lo..=hi).map(|i| ent(i, term)).collect()
}

fn small() -> StorageOptions {
    StorageOptions {
        segment_size: 512,
        ..StorageOptions::default()
    }
}

fn open(dir: &Path) -> (Storage, Recovered) {
    match Storage::open(dir, small()) {
        Ok(x) => x,
        Err(e) => panic!("open {}: {e}", dir.display()),
    }
}

fn open_err(dir: &Path) -> StorageError {
    match Storage::open(dir, small()) {
        Ok((_, rec)) => panic!(
            "open {} should fail, recovered {} entries",
            dir.display(),
            rec.entries.len()
        ),
        Err(e) => e,
    }
}

fn snap(index: Index, term: Term) -> SnapshotMeta {
    SnapshotMeta {
        index,
        term,
        conf_state: ConfState::with_voters([1, 2, 3]),
    }
}

/// The segment files, in order.
fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir.join(WAL_DIR))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    v.sort();
    v
}

/// `(offset, length)` of every record in a file.
fn records(path: &Path) -> Vec<(u64, u64)> {
    let bytes = fs::read(path).unwrap();
    let mut out = Vec::new();
    let mut at = 0usize;
    while at + 8 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        out.push((at as u64, (8 + len) as u64));
        at += 8 + len;
    }
    assert_eq!(at, bytes.len(), "test helper expects whole records");
    out
}

fn copy_tree(src: &Path, dst: &Path) {
    fs::create_dir_all(dst).unwrap();
    for e in fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &to);
        } else {
            fs::copy(e.path(), &to).unwrap();
        }
    }
}

fn flip_bit(path: &Path, offset: u64, bit: u8) {
    let mut bytes = fs::read(path).unwrap();
    bytes[offset as usize] ^= 1 << bit;
    fs::write(path, bytes).unwrap();
}

fn truncate(path: &Path, len: u64) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.set_len(len).unwrap();
}

/// Asserts the error reports damage in `path` at `offset`, and says so.
fn assert_corrupt_at(err: &StorageError, path: &Path, offset: u64) {
    match err {
        StorageError::Corrupt {
            path: p, offset: o, ..
        } => {
            assert_eq!((p.as_path(), *o), (path, offset), "{err}");
        }
        other => panic!("expected corruption, got {other}"),
    }
    let shown = err.to_string();
    assert!(shown.contains(&path.display().to_string()), "{shown}");
    assert!(shown.contains(&format!("offset {offset}")), "{shown}");
}

/// A storage holding entries `1..=n` of term 1, closed cleanly, spread over
/// several segments.
fn written(n: Index) -> (TempDir, Vec<Entry>) {
    let tmp = TempDir::new().unwrap();
    let (mut st, rec) = open(tmp.path());
    assert_eq!(rec, Recovered::default());
    let all = ents(1, n, 1);
    for chunk in all.chunks(7) {
        st.append(chunk).unwrap();
        st.sync().unwrap();
    }
    st.set_hard_state(HardState {
        term: 1,
        vote: Some(1),
        commit: n,
    })
    .unwrap();
    st.close().unwrap();
    (tmp, all)
}

// ---- round trips ---------------------------------------------------------

#[test]
fn reopen_returns_the_same_entries_and_hard_state() {
    let (tmp, all) = written(100);
    let segs = segments(tmp.path());
    assert!(segs.len() >= 3, "expected several segments, got {segs:?}");
    for (i, p) in segs.iter().enumerate() {
        let (seq, _) = wal::parse_segment_name(p.file_name().unwrap().to_str().unwrap()).unwrap();
        assert_eq!(seq, i as u64 + 1);
        assert!(fs::metadata(p).unwrap().len() <= 512);
    }
    let (st, rec) = open(tmp.path());
    assert_eq!(rec.entries, all);
    assert_eq!(
        rec.hard_state,
        HardState {
            term: 1,
            vote: Some(1),
            commit: 100
        }
    );
    assert_eq!(rec.snapshot, None);
    assert_eq!((st.first_index(), st.last_index()), (1, 100));
    assert_eq!(st.term(50), Some(1));
    assert_eq!(st.term(101), None);
}

#[test]
fn empty_storage_round_trips() {
    let tmp = TempDir::new().unwrap();
    let (st, rec) = open(tmp.path());
    assert_eq!(rec, Recovered::default());
    st.close().unwrap();
    let (st, rec) = open(tmp.path());
    assert_eq!(rec, Recovered::default());
    assert_eq!(st.last_index(), 0);
}

#[test]
fn default_options_round_trip() {
    let tmp = TempDir::new().unwrap();
    let (mut st, _) = Storage::open(tmp.path(), StorageOptions::default()).unwrap();
    st.append(&ents(1, 1000, 3)).unwrap();
    st.close().unwrap();
    let (_, rec) = Storage::open(tmp.path(), StorageOptions::default()).unwrap();
    assert_eq!(rec.entries, ents(1, 1000, 3));
    assert_eq!(segments(tmp.path()).len(), 1);
}

#[test]
fn all_payload_kinds_round_trip() {
    let tmp = TempDir::new().unwrap();
    let (mut st, _) = open(tmp.path());
    let list = vec![
        Entry {
            term: 1,
            index: 1,
            payload: EntryPayload::Empty,
        },
        Entry {
            term: 1,
            index: 2,
            payload: EntryPayload::ConfChange(crate::raft::ConfChange::AddLearner(4)),
        },
        Entry {
            term: 2,
            index: 3,
            payload: EntryPayload::Normal(vec![0; 700].into()),
        },
        Entry {
            term: 2,
            index: 4,
            payload: EntryPayload::Normal(Vec::new().into()),
        },
    ];
    st.append(&list).unwrap();
    st.close().unwrap();
    assert_eq!(open(tmp.path()).1.entries, list);
}

// ---- torn tails ----------------------------------------------------------

#[test]
fn cut_inside_the_last_record_at_every_offset() {
    let (tmp, all) = written(30);
    let segs = segments(tmp.path());
    let last_seg = segs.last().unwrap().clone();
    let recs = records(&last_seg);
    let (start, len) = *recs.last().unwrap();
    for cut in start..start + len {
        let case = TempDir::new().unwrap();
        copy_tree(tmp.path(), case.path());
        let seg = case.path().join(last_seg.strip_prefix(tmp.path()).unwrap());
        truncate(&seg, cut);

        let (mut st, rec) = open(case.path());
        assert_eq!(rec.entries, all[..29], "cut at {cut}");
        assert_eq!(fs::metadata(&seg).unwrap().len(), start, "cut at {cut}");
        let replacement = Entry {
            term: 2,
            index: 30,
            payload: EntryPayload::Normal(b"after the cut".to_vec().into()),
        };
        st.append(std::slice::from_ref(&replacement)).unwrap();
        st.append(&[ent(31, 2)]).unwrap();
        st.sync().unwrap();
        drop(st);

        let (_, rec) = open(case.path());
        let mut expect = all[..29].to_vec();
        expect.push(replacement);
        expect.push(ent(31, 2));
        assert_eq!(rec.entries, expect, "cut at {cut}");
    }
}

#[test]
fn short_header_and_empty_last_segment_are_cut() {
    let (tmp, all) = written(30);
    // Append three garbage bytes: less than a header.
    let last_seg = segments(tmp.path()).pop().unwrap();
    let mut f = OpenOptions::new().append(true).open(&last_seg).unwrap();
    f.write_all(&[7, 0, 0]).unwrap();
    drop(f);
    let (_, rec) = open(tmp.path());
    assert_eq!(rec.entries, all);
}

#[test]
fn bit_flips_in_the_tail_record_are_cut() {
    let (tmp, all) = written(30);
    let last_seg = segments(tmp.path()).pop().unwrap();
    let (start, len) = *records(&last_seg).last().unwrap();
    for offset in start..start + len {
        let bit = (offset % 8) as u8;
        let case = TempDir::new().unwrap();
        copy_tree(tmp.path(), case.path());
        let seg = case.path().join(last_seg.strip_prefix(tmp.path()).unwrap());
        flip_bit(&seg, offset, bit);
        let (mut st, rec) = open(case.path());
        assert_eq!(rec.entries, all[..29], "flip at {offset}");
        st.append(&[ent(30, 5)]).unwrap();
        st.close().unwrap();
        assert_eq!(open(case.path()).1.entries.last(), Some(&ent(30, 5)));
    }
}

#[test]
fn zero_filled_tail_is_cut() {
    let (tmp, all) = written(30);
    let last_seg = segments(tmp.path()).pop().unwrap();
    let mut f = OpenOptions::new().append(true).open(&last_seg).unwrap();
    f.write_all(&[0; 4096]).unwrap();
    drop(f);
    let (_, rec) = open(tmp.path());
    assert_eq!(rec.entries, all);
}

#[test]
fn large_torn_record_of_repetitive_data_is_cut() {
    // Every byte offset of the torn payload has a plausible header; the scan
    // for a valid record after the damage must still be cheap and find none.
    let tmp = TempDir::new().unwrap();
    let (mut st, _) = Storage::open(tmp.path(), StorageOptions::default()).unwrap();
    st.append(&ents(1, 3, 1)).unwrap();
    let pattern: Vec<u8> = [0u8, 0x10, 0, 0, 1, 0x20, 0, 0].repeat(1 << 19);
    let big = Entry {
        term: 1,
        index: 4,
        payload: EntryPayload::Normal(pattern.into()),
    };
    st.append(std::slice::from_ref(&big)).unwrap();
    st.close().unwrap();
    let seg = segments(tmp.path()).pop().unwrap();
    let (start, len) = *records(&seg).last().unwrap();
    truncate(&seg, start + len / 2);
    let began = std::time::Instant::now();
    let (_, rec) = Storage::open(tmp.path(), StorageOptions::default()).unwrap();
    assert_eq!(rec.entries, ents(1, 3, 1));
    eprintln!("recovered a 2 MiB torn record in {:?}", began.elapsed());
}

#[test]
fn bit_flips_in_a_middle_record_of_the_last_segment_are_errors() {
    let (tmp, _) = written(30);
    let last_seg = segments(tmp.path()).pop().unwrap();
    let recs = records(&last_seg);
    assert!(recs.len() >= 3);
    let (start, len) = recs[recs.len() - 2];
    for offset in start..start + len {
        let case = TempDir::new().unwrap();
        copy_tree(tmp.path(), case.path());
        let seg = case.path().join(last_seg.strip_prefix(tmp.path()).unwrap());
        flip_bit(&seg, offset, (offset % 8) as u8);
        let err = open_err(case.path());
        assert_corrupt_at(&err, &seg, start);
        // Nothing was modified by the failed open.
        assert_eq!(
            fs::metadata(&seg).unwrap().len(),
            fs::metadata(&last_seg).unwrap().len()
        );
    }
}

#[test]
fn damage_in_an_earlier_segment_is_an_error() {
    let (tmp, _) = written(60);
    let first = segments(tmp.path())[0].clone();
    let recs = records(&first);
    // A middle record, the first record and the last one (a sealed segment's
    // tail is never torn).
    for &(start, len) in [recs[recs.len() / 2], recs[0], *recs.last().unwrap()].iter() {
        for offset in [start, start + 5, start + len / 2, start + len - 1] {
            let case = TempDir::new().unwrap();
            copy_tree(tmp.path(), case.path());
            let seg = case.path().join(first.strip_prefix(tmp.path()).unwrap());
            flip_bit(&seg, offset, 3);
            assert_corrupt_at(&open_err(case.path()), &seg, start);
        }
    }
    // A sealed segment cut short.
    let case = TempDir::new().unwrap();
    copy_tree(tmp.path(), case.path());
    let seg = case.path().join(first.strip_prefix(tmp.path()).unwrap());
    let (start, len) = *recs.last().unwrap();
    truncate(&seg, start + len - 1);
    assert_corrupt_at(&open_err(case.path()), &seg, start);
}

#[test]
fn oversized_length_field_is_a_tail_cut_at_the_end_and_an_error_in_the_middle() {
    let (tmp, all) = written(30);
    let last_seg = segments(tmp.path()).pop().unwrap();
    // At the end: a header claiming 1 GiB, followed by some bytes.
    let case = TempDir::new().unwrap();
    copy_tree(tmp.path(), case.path());
    let seg = case.path().join(last_seg.strip_prefix(tmp.path()).unwrap());
    let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
    let mut junk = (1u32 << 30).to_le_bytes().to_vec();
    junk.extend_from_slice(&[0xab; 40]);
    f.write_all(&junk).unwrap();
    drop(f);
    assert_eq!(open(case.path()).1.entries, all);

    // In the middle: overwrite a middle record's length with 1 GiB.
    let recs = records(&last_seg);
    let (start, _) = recs[recs.len() - 2];
    let mut bytes = fs::read(&last_seg).unwrap();
    bytes[start as usize..start as usize + 4].copy_from_slice(&(1u32 << 30).to_le_bytes());
    fs::write(&last_seg, bytes).unwrap();
    let err = open_err(tmp.path());
    assert_corrupt_at(&err, &last_seg, start);
    assert!(matches!(
        err,
        StorageError::Corrupt {
            kind: Corruption::TooLong { .. },
            ..
        }
    ));
}

#[test]
fn a_record_over_the_maximum_is_refused() {
    let tmp = TempDir::new().unwrap();
    let opts = StorageOptions {
        max_record_size: 100,
        ..small()
    };
    let (mut st, _) = Storage::open(tmp.path(), opts).unwrap();
    st.append(&[ent(1, 1)]).unwrap();
    let big = Entry {
        term: 1,
        index: 3,
        payload: EntryPayload::Normal(vec![1; 200].into()),
    };
    let err = st.append(&[ent(2, 1), big]).unwrap_err();
    assert!(
        matches!(err, StorageError::RecordTooLarge { index: 3, .. }),
        "{err}"
    );
    // Nothing of the refused batch was written; the storage still works.
    assert_eq!(st.last_index(), 1);
    st.append(&[ent(2, 1)]).unwrap();
    st.close().unwrap();
    assert_eq!(open(tmp.path()).1.entries, ents(1, 2, 1));
}

// ---- structural damage ---------------------------------------------------

#[test]
fn missing_middle_segment_is_an_error() {
    let (tmp, _) = written(60);
    let segs = segments(tmp.path());
    assert!(segs.len() >= 3);
    fs::remove_file(&segs[1]).unwrap();
    let err = open_err(tmp.path());
    assert_corrupt_at(&err, &segs[2], 0);
    assert!(matches!(
        err,
        StorageError::Corrupt {
            kind: Corruption::SequenceGap { .. },
            ..
        }
    ));
}

#[test]
fn missing_first_segments_without_a_snapshot_is_an_error() {
    let (tmp, _) = written(60);
    let segs = segments(tmp.path());
    fs::remove_file(&segs[0]).unwrap();
    let err = open_err(tmp.path());
    assert_corrupt_at(&err, &segs[1], 0);
    assert!(matches!(
        err,
        StorageError::Corrupt {
            kind: Corruption::LogAfterSnapshot { .. },
            ..
        }
    ));
}

#[test]
fn swapped_segment_contents_are_an_error() {
    let (tmp, _) = written(60);
    let segs = segments(tmp.path());
    let a = fs::read(&segs[1]).unwrap();
    let b = fs::read(&segs[2]).unwrap();
    fs::write(&segs[1], b).unwrap();
    fs::write(&segs[2], a).unwrap();
    let err = open_err(tmp.path());
    assert_corrupt_at(&err, &segs[1], 0);
}

#[test]
fn swapped_segment_sequence_numbers_are_an_error() {
    let (tmp, _) = written(60);
    let segs = segments(tmp.path());
    let name =
        |p: &Path| wal::parse_segment_name(p.file_name().unwrap().to_str().unwrap()).unwrap();
    let (s1, f1) = name(&segs[1]);
    let (s2, f2) = name(&segs[2]);
    let wal_dir = tmp.path().join(WAL_DIR);
    let new1 = wal_dir.join(wal::segment_name(s2, f1));
    let new2 = wal_dir.join(wal::segment_name(s1, f2));
    fs::rename(&segs[1], &new1).unwrap();
    fs::rename(&segs[2], &new2).unwrap();
    let err = open_err(tmp.path());
    assert_corrupt_at(&err, &new2, 0);
}

#[test]
fn renamed_segment_is_an_error() {
    let (tmp, _) = written(60);
    let segs = segments(tmp.path());
    let (seq, first) =
        wal::parse_segment_name(segs[2].file_name().unwrap().to_str().unwrap()).unwrap();
    let renamed = tmp
        .path()
        .join(WAL_DIR)
        .join(wal::segment_name(seq, first + 1));
    fs::rename(&segs[2], &renamed).unwrap();
    let err = open_err(tmp.path());
    assert_corrupt_at(&err, &renamed, 0);
    assert!(matches!(
        err,
        StorageError::Corrupt {
            kind: Corruption::SegmentStart { .. },
            ..
        }
    ));

    // And a name that is not a segment name at all.
    fs::rename(&renamed, &segs[2]).unwrap();
    let bad = tmp.path().join(WAL_DIR).join("zz-1.wal");
    fs::write(&bad, b"").unwrap();
    assert_corrupt_at(&open_err(tmp.path()), &bad, 0);
}

// ---- hard state ----------------------------------------------------------

#[test]
fn corrupt_hardstate_is_an_error_naming_the_file() {
    let (tmp, _) = written(5);
    let path = tmp.path().join(hardstate::FILE);
    let good = fs::read(&path).unwrap();
    for offset in 0..good.len() as u64 {
        fs::write(&path, &good).unwrap();
        flip_bit(&path, offset, (offset % 8) as u8);
        let err = open_err(tmp.path());
        assert!(err.is_corruption(), "{err}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }
    // Cut short, and with bytes after it.
    fs::write(&path, &good[..good.len() - 1]).unwrap();
    assert!(open_err(tmp.path()).to_string().contains("hardstate"));
    let mut longer = good.clone();
    longer.push(0);
    fs::write(&path, &longer).unwrap();
    assert_corrupt_at(&open_err(tmp.path()), &path, good.len() as u64);
    fs::write(&path, &good).unwrap();
    open(tmp.path());
}

#[test]
fn leftover_hardstate_tmp_is_ignored() {
    let (tmp, _) = written(5);
    let tmp_file = tmp.path().join(hardstate::TMP_FILE);
    fs::write(&tmp_file, b"half a hard state").unwrap();
    let (_, rec) = open(tmp.path());
    assert_eq!(rec.hard_state.term, 1);
    assert_eq!(rec.hard_state.commit, 5);
    assert!(!tmp_file.exists());
}

#[test]
fn term_and_vote_are_durable_at_once_commit_is_deferred() {
    let tmp = TempDir::new().unwrap();
    let (mut st, _) = open(tmp.path());
    st.append(&ents(1, 10, 2)).unwrap();
    st.sync().unwrap();
    let hs = HardState {
        term: 2,
        vote: Some(3),
        commit: 4,
    };
    st.set_hard_state(hs).unwrap();
    assert_eq!(hardstate::read(tmp.path()).unwrap(), Some(hs));
    let writes = st.stats().hard_state_writes;
    st.set_hard_state(HardState { commit: 9, ..hs }).unwrap();
    assert_eq!(
        st.stats().hard_state_writes,
        writes,
        "commit alone is deferred"
    );
    assert_eq!(st.durable_hard_state(), hs);
    assert_eq!(st.hard_state().commit, 9);
    // A crash now loses the commit index, nothing else.
    drop(st);
    let (mut st, rec) = open(tmp.path());
    assert_eq!(rec.hard_state, hs);
    // A vote change carries the latest commit along.
    st.set_hard_state(HardState {
        term: 3,
        vote: None,
        commit: 9,
    })
    .unwrap();
    drop(st);
    assert_eq!(
        open(tmp.path()).1.hard_state,
        HardState {
            term: 3,
            vote: None,
            commit: 9
        }
    );
    // So do close and compact.
    let (mut st, _) = open(tmp.path());
    st.set_hard_state(HardState {
        term: 3,
        vote: None,
        commit: 10,
    })
    .unwrap();
    st.close().unwrap();
    assert_eq!(open(tmp.path()).1.hard_state.commit, 10);
    let (mut st, _) = open(tmp.path());
    st.save_snapshot(&snap(5, 2), b"img").unwrap();
    st.set_hard_state(HardState {
        term: 3,
        vote: None,
        commit: 11,
    })
    .unwrap();
    st.compact(5).unwrap();
    drop(st);
    assert_eq!(open(tmp.path()).1.hard_state.commit, 11);
}

// ---- truncation ----------------------------------------------------------

#[test]
fn conflicting_suffix_is_replaced_and_survives_reopen() {
    let tmp = TempDir::new().unwrap();
    let (mut st, _) = open(tmp.path());
    st.append(&ents(1, 10, 1)).unwrap();
    st.append(&ents(6, 8, 2)).unwrap();
    assert_eq!(st.last_index(), 8);
    assert_eq!(st.term(6), Some(2));
    assert_eq!(st.term(5), Some(1));
    st.close().unwrap();
    let mut expect = ents(1, 5, 1);
    expect.extend(ents(6, 8, 2));
    let (mut st, rec) = open(tmp.path());
    assert_eq!(rec.entries, expect);

    // Truncating back across several segments, then growing again.
    st.append(&ents(9, 80, 2)).unwrap();
    st.append(&ents(3, 4, 3)).unwrap();
    st.append(&ents(5, 40, 3)).unwrap();
    st.close().unwrap();
    let mut expect = ents(1, 2, 1);
    expect.extend(ents(3, 40, 3));
    let (mut st, rec) = open(tmp.path());
    assert_eq!(rec.entries, expect);
    // Replacing just the last entry.
    st.append(&[ent(40, 4)]).unwrap();
    st.close().unwrap();
    expect[39] = ent(40, 4);
    assert_eq!(open(tmp.path()).1.entries, expect);
}

#[test]
fn invalid_appends_are_refused() {
    let tmp = TempDir::new().unwrap();
    let (mut st, _) = open(tmp.path());
    st.append(&ents(1, 5, 1)).unwrap();
    let gap = st.append(&[ent(7, 1)]).unwrap_err();
    assert!(
        matches!(gap, StorageError::InvalidAppend { index: 7, .. }),
        "{gap}"
    );
    let holes = st.append(&[ent(6, 1), ent(8, 1)]).unwrap_err();
    assert!(
        matches!(holes, StorageError::InvalidAppend { index: 8, .. }),
        "{holes}"
    );
    assert!(st.append(&[ent(0, 1)]).is_err());
    st.save_snapshot(&snap(3, 1), b"x").unwrap();
    let covered = st.append(&[ent(3, 2)]).unwrap_err();
    assert!(
        matches!(covered, StorageError::InvalidAppend { index: 3, .. }),
        "{covered}"
    );
    assert_eq!(st.last_index(), 5);
    st.append(&[]).unwrap();
    st.close().unwrap();
    let (_, rec) = open(tmp.path());
    assert_eq!(rec.entries, ents(4, 5, 1));
}

// ---- snapshots and compaction -------------------------------------------

#[test]
fn compaction_drops_old_segments_and_reopen_yields_snapshot_and_rest() {
    let (tmp, all) = written(150);
    let before = segments(tmp.path());
    let (mut st, _) = open(tmp.path());
    let meta = snap(100, 1);
    st.save_snapshot(&meta, b"state at 100").unwrap();
    assert_eq!(segments(tmp.path()), before, "saving does not compact");
    assert!(matches!(
        st.compact(101),
        Err(StorageError::CompactBeyondSnapshot {
            index: 101,
            snapshot: 100
        })
    ));
    st.compact(100).unwrap();
    let after = segments(tmp.path());
    assert!(after.len() < before.len());
    assert_eq!(after, before[before.len() - after.len()..]);
    // Every remaining segment still holds an entry after 100; every dropped
    // one held none.
    assert!(st.sealed.iter().all(|s| s.max_index > 100));
    assert_eq!(st.first_index(), 101);
    st.append(&ents(151, 160, 2)).unwrap();
    st.close().unwrap();

    let (st, rec) = open(tmp.path());
    assert_eq!(rec.snapshot, Some(meta.clone()));
    let mut expect = all[100..].to_vec();
    expect.extend(ents(151, 160, 2));
    assert_eq!(rec.entries, expect);
    assert_eq!(st.read_snapshot_data(&meta).unwrap(), b"state at 100");
    assert_eq!(st.term(100), Some(1));
    assert_eq!(st.term(99), None);

    let init = rec.into_initial_state(ConfState::with_voters([9]));
    assert_eq!(init.snapshot, meta);
    assert_eq!(init.applied, 100);
    assert_eq!(init.entries.first().map(|e| e.index), Some(101));
}

#[test]
fn compaction_keeps_a_requested_tail() {
    let (tmp, all) = written(150);
    let (mut st, _) = open(tmp.path());
    st.save_snapshot(&snap(140, 1), b"s").unwrap();
    st.compact(60).unwrap();
    assert!(st.sealed.iter().all(|s| s.max_index > 60));
    drop(st);
    let (_, rec) = open(tmp.path());
    assert_eq!(rec.entries, all[140..]);
    // The log still reaches back to 61 on disk.
    let replayed = wal::replay(&tmp.path().join(WAL_DIR), 1 << 20).unwrap();
    assert!(replayed.base <= 60);
}

#[test]
fn log_after_snapshot_gap_is_an_error() {
    let (tmp, _) = written(150);
    let (mut st, _) = open(tmp.path());
    st.save_snapshot(&snap(100, 1), b"s").unwrap();
    st.compact(100).unwrap();
    st.close().unwrap();
    // Losing the snapshot leaves a log that starts after the older state.
    let dir = tmp
        .path()
        .join(SNAPSHOT_DIR)
        .join(snapshot::dir_name(100, 1));
    fs::remove_dir_all(dir).unwrap();
    let err = open_err(tmp.path());
    assert!(matches!(
        err,
        StorageError::Corrupt {
            kind: Corruption::LogAfterSnapshot { snapshot: 0, .. },
            ..
        }
    ));
}

#[test]
fn snapshot_beyond_the_log_restarts_it() {
    let (tmp, _) = written(50);
    let (mut st, _) = open(tmp.path());
    let old_segments = segments(tmp.path());
    let meta = snap(100, 3);
    st.save_snapshot(&meta, b"from the leader").unwrap();
    assert_eq!(st.last_index(), 100);
    assert_eq!(st.term(100), Some(3));
    let segs = segments(tmp.path());
    assert_eq!(segs.len(), 1);
    assert!(!old_segments.contains(&segs[0]));
    drop(st);

    let (mut st, rec) = open(tmp.path());
    assert_eq!(rec.snapshot, Some(meta.clone()));
    assert!(rec.entries.is_empty());
    st.append(&ents(101, 130, 3)).unwrap();
    st.close().unwrap();
    let (_, rec) = open(tmp.path());
    assert_eq!(rec.entries, ents(101, 130, 3));
}

/// An installed snapshot (one from another member) comes with the entries
/// the core holds after it: the log restarts after the snapshot with them,
/// durable when the install returns (no sync, no close before the "crash"
/// here), whether or not the log held the snapshot's index; and what the
/// log held after it is gone, as the core dropped it.
#[test]
fn an_installed_snapshot_and_the_entries_after_it_are_durable_together() {
    for held in [30, 150] {
        let (tmp, _) = written(held);
        let (mut st, _) = open(tmp.path());
        let meta = snap(100, 1);
        let image = staged(&st, b"from a peer");
        st.install_snapshot_image(&meta, image, &ents(101, 104, 2))
            .unwrap();
        assert_eq!(st.last_index(), 104);
        drop(st);
        let (st, rec) = open(tmp.path());
        assert_eq!(rec.snapshot, Some(meta.clone()), "log held {held}");
        assert_eq!(rec.entries, ents(101, 104, 2), "log held {held}");
        assert_eq!(st.read_snapshot_data(&meta).unwrap(), b"from a peer");
    }
    // Entries that do not follow it are refused before anything is
    // written.
    let (tmp, _) = written(30);
    let (mut st, _) = open(tmp.path());
    let image = staged(&st, b"x");
    assert!(matches!(
        st.install_snapshot_image(&snap(100, 1), image, &ents(102, 103, 1)),
        Err(StorageError::InvalidAppend { index: 102, .. })
    ));
    assert_eq!(st.snapshot(), None);
    st.append(&ents(31, 32, 1)).unwrap();
}

/// A crash in the middle of an install: the segment restarting the log
/// after the snapshot is written, the snapshot not yet renamed into place.
/// Open rolls the install back — the restart goes, the previous snapshot
/// and the log after it are what they were — where it used to refuse to
/// open ("the log starts after the latest snapshot").
#[test]
fn an_interrupted_install_is_rolled_back_on_open() {
    let tmp = TempDir::new().unwrap();
    let (mut st, _) = open(tmp.path());
    st.append(&ents(1, 30, 1)).unwrap();
    st.sync().unwrap();
    st.register_snapshot(prepared(&st, &snap(10, 1), b"image at 10"))
        .unwrap();
    st.close().unwrap();
    let before = TempDir::new().unwrap();
    copy_tree(tmp.path(), before.path());
    let later = TempDir::new().unwrap();
    copy_tree(tmp.path(), later.path());

    // The install, completed, in the original directory.
    let (mut st, _) = open(tmp.path());
    let image = staged(&st, b"image at 50");
    st.install_snapshot_image(&snap(50, 2), image, &ents(51, 55, 2))
        .unwrap();
    drop(st);
    let restart = segments(tmp.path());
    assert_eq!(restart.len(), 1);

    // The crash: the old log and snapshots, plus the restart segment.
    let crashed = before.path();
    let name = restart[0].file_name().unwrap();
    fs::copy(&restart[0], crashed.join(WAL_DIR).join(name)).unwrap();
    let (mut st, rec) = open(crashed);
    assert_eq!(rec.snapshot, Some(snap(10, 1)));
    assert_eq!(rec.entries, ents(11, 30, 1));
    assert!(!crashed.join(WAL_DIR).join(name).exists());
    // The log goes on from there.
    st.append(&ents(31, 33, 1)).unwrap();
    st.close().unwrap();
    let (_, rec) = open(crashed);
    assert_eq!(rec.entries, ents(11, 33, 1));

    // A crash later in the install — the snapshot in place, the old
    // segments not yet removed — is a finished install: nothing is rolled
    // back.
    fs::copy(&restart[0], later.path().join(WAL_DIR).join(name)).unwrap();
    let snap_name = snapshot::dir_name(50, 2);
    copy_tree(
        &tmp.path().join(SNAPSHOT_DIR).join(&snap_name),
        &later.path().join(SNAPSHOT_DIR).join(&snap_name),
    );
    let (_, rec) = open(later.path());
    assert_eq!(rec.snapshot, Some(snap(50, 2)));
    assert_eq!(rec.entries, ents(51, 55, 2));
}

/// After a finished install the log goes on in the restart segment and
/// the segments after it (rotated: small segments here), with one
/// snapshot kept: reopened, nothing is taken for an interrupted install.
#[test]
fn the_log_after_a_finished_install_is_kept_whole() {
    let tmp = TempDir::new().unwrap();
    let options = StorageOptions {
        snapshots_to_keep: 1,
        ..small()
    };
    let (mut st, _) = Storage::open(tmp.path(), options.clone()).unwrap();
    st.append(&ents(1, 30, 1)).unwrap();
    st.sync().unwrap();
    let image = staged(&st, b"image at 50");
    st.install_snapshot_image(&snap(50, 2), image, &ents(51, 55, 2))
        .unwrap();
    st.append(&ents(56, 120, 2)).unwrap();
    st.sync().unwrap();
    assert!(segments(tmp.path()).len() > 2, "rotated");
    drop(st);
    let (st, rec) = Storage::open(tmp.path(), options.clone()).unwrap();
    assert_eq!(rec.snapshot, Some(snap(50, 2)));
    assert_eq!(rec.entries, ents(51, 120, 2));
    // And a second install that a crash interrupted goes back to this.
    st.close().unwrap();
    let before = TempDir::new().unwrap();
    copy_tree(tmp.path(), before.path());
    let (mut st, _) = Storage::open(tmp.path(), options.clone()).unwrap();
    let image = staged(&st, b"image at 200");
    st.install_snapshot_image(&snap(200, 3), image, &ents(201, 202, 3))
        .unwrap();
    drop(st);
    let restart = segments(tmp.path());
    assert_eq!(restart.len(), 1);
    let name = restart[0].file_name().unwrap();
    fs::copy(&restart[0], before.path().join(WAL_DIR).join(name)).unwrap();
    let (_, rec) = Storage::open(before.path(), options).unwrap();
    assert_eq!(rec.snapshot, Some(snap(50, 2)));
    assert_eq!(rec.entries, ents(51, 120, 2));
}

#[test]
fn snapshot_conflicting_with_the_log_discards_the_conflicting_entries() {
    let (tmp, _) = written(150);
    let (mut st, _) = open(tmp.path());
    // The leader's snapshot ends at 100 in term 2; this log has term 1 there.
    st.save_snapshot(&snap(100, 2), b"s").unwrap();
    assert_eq!(st.last_index(), 100);
    st.append(&ents(101, 105, 2)).unwrap();
    st.close().unwrap();
    let (_, rec) = open(tmp.path());
    assert_eq!(rec.entries, ents(101, 105, 2));
}

#[test]
fn local_snapshot_keeps_the_log_after_it() {
    let (tmp, all) = written(50);
    let (mut st, _) = open(tmp.path());
    st.save_snapshot(&snap(30, 1), b"s").unwrap();
    assert_eq!(st.last_index(), 50);
    drop(st);
    assert_eq!(open(tmp.path()).1.entries, all[30..]);
}

#[test]
fn crash_between_storing_a_snapshot_and_restarting_the_log() {
    // A snapshot stored by another instance, copied in, stands for a crash
    // right after the rename: the log still has the conflicting entries.
    let (tmp, _) = written(150);
    let other = TempDir::new().unwrap();
    let (mut st, _) = open(other.path());
    st.save_snapshot(&snap(100, 2), b"leader's image").unwrap();
    drop(st);
    let name = snapshot::dir_name(100, 2);
    copy_tree(
        &other.path().join(SNAPSHOT_DIR).join(&name),
        &tmp.path().join(SNAPSHOT_DIR).join(&name),
    );
    // And a restart segment that was being written.
    fs::write(
        tmp.path()
            .join(WAL_DIR)
            .join("0000000000000099-0000000000000065.wal.tmp"),
        b"x",
    )
    .unwrap();

    let (mut st, rec) = open(tmp.path());
    assert_eq!(rec.snapshot, Some(snap(100, 2)));
    assert!(rec.entries.is_empty());
    assert_eq!(st.last_index(), 100);
    assert_eq!(segments(tmp.path()).len(), 1);
    assert!(
        !tmp.path()
            .join(WAL_DIR)
            .join("0000000000000099-0000000000000065.wal.tmp")
            .exists()
    );
    st.append(&ents(101, 103, 2)).unwrap();
    st.close().unwrap();
    assert_eq!(open(tmp.path()).1.entries, ents(101, 103, 2));

    // Same with a log that ends before the snapshot.
    let (tmp, _) = written(40);
    copy_tree(
        &other.path().join(SNAPSHOT_DIR).join(&name),
        &tmp.path().join(SNAPSHOT_DIR).join(&name),
    );
    let (mut st, rec) = open(tmp.path());
    assert!(rec.entries.is_empty());
    st.append(&ents(101, 101, 2)).unwrap();
    st.close().unwrap();
    assert_eq!(open(tmp.path()).1.entries, ents(101, 101, 2));
}

#[test]
fn interrupted_restart_leaves_a_recoverable_log() {
    // The restart segment is in place but older segments were not all
    // removed yet: a contiguous suffix of them remains.
    let (tmp, _) = written(150);
    let (mut st, _) = open(tmp.path());
    let old = segments(tmp.path());
    let keep = TempDir::new().unwrap();
    for p in &old {
        fs::copy(p, keep.path().join(p.file_name().unwrap())).unwrap();
    }
    st.save_snapshot(&snap(120, 2), b"s").unwrap();
    drop(st);
    for p in &old[old.len() / 2..] {
        fs::copy(keep.path().join(p.file_name().unwrap()), p).unwrap();
    }
    let (mut st, rec) = open(tmp.path());
    assert!(rec.entries.is_empty());
    assert_eq!(rec.snapshot, Some(snap(120, 2)));
    st.append(&ents(121, 125, 2)).unwrap();
    st.close().unwrap();
    assert_eq!(open(tmp.path()).1.entries, ents(121, 125, 2));
}

#[test]
fn keeps_the_newest_two_snapshots_and_removes_unfinished_ones() {
    let tmp = TempDir::new().unwrap();
    let (mut st, _) = open(tmp.path());
    st.append(&ents(1, 40, 1)).unwrap();
    for i in 1..=4 {
        st.save_snapshot(&snap(i * 10, 1), format!("image {i}").as_bytes())
            .unwrap();
    }
    let kept: Vec<Index> = st.snapshots().map(|m| m.index).collect();
    assert_eq!(kept, vec![30, 40]);
    assert!(matches!(
        st.save_snapshot(&snap(20, 1), b"old"),
        Err(StorageError::StaleSnapshot { index: 20, .. })
    ));
    assert!(matches!(
        st.read_snapshot_data(&snap(10, 1)),
        Err(StorageError::SnapshotNotFound { .. })
    ));
    assert_eq!(st.read_snapshot_data(&snap(30, 1)).unwrap(), b"image 3");
    // Saving the same snapshot again keeps the stored one.
    st.save_snapshot(&snap(40, 1), b"image 4 again").unwrap();
    assert_eq!(st.read_snapshot_data(&snap(40, 1)).unwrap(), b"image 4");
    drop(st);

    let snap_dir = tmp.path().join(SNAPSHOT_DIR);
    let names = names_in(&snap_dir);
    assert_eq!(
        names,
        vec![snapshot::dir_name(30, 1), snapshot::dir_name(40, 1)]
    );

    // Leftovers of a crash while writing or deleting.
    fs::create_dir_all(snap_dir.join("tmp-0000000000000032-0000000000000001-1-1")).unwrap();
    fs::write(
        snap_dir.join("tmp-0000000000000032-0000000000000001-1-1/data"),
        b"part",
    )
    .unwrap();
    let (st, rec) = open(tmp.path());
    assert_eq!(rec.snapshot, Some(snap(40, 1)));
    assert_eq!(st.snapshots().count(), 2);
    assert_eq!(fs::read_dir(&snap_dir).unwrap().count(), 2);
}

#[test]
fn corrupt_snapshot_meta_is_an_error() {
    let tmp = TempDir::new().unwrap();
    let (mut st, _) = open(tmp.path());
    st.append(&ents(1, 10, 1)).unwrap();
    st.save_snapshot(&snap(10, 1), b"image").unwrap();
    st.close().unwrap();
    let dir = tmp
        .path()
        .join(SNAPSHOT_DIR)
        .join(snapshot::dir_name(10, 1));
    let meta = dir.join(snapshot::META_FILE);
    let good = fs::read(&meta).unwrap();
    for offset in 0..good.len() as u64 {
        fs::write(&meta, &good).unwrap();
        flip_bit(&meta, offset, 6);
        let err = open_err(tmp.path());
        assert!(
            err.to_string().contains(&meta.display().to_string()),
            "{err}"
        );
    }
    fs::write(&meta, &good).unwrap();
    // A directory name that disagrees with the metadata.
    let renamed = tmp
        .path()
        .join(SNAPSHOT_DIR)
        .join(snapshot::dir_name(10, 2));
    fs::rename(&dir, &renamed).unwrap();
    let err = open_err(tmp.path());
    assert!(matches!(
        err,
        StorageError::Corrupt {
            kind: Corruption::SnapshotNameMismatch { .. },
            ..
        }
    ));
    fs::rename(&renamed, &dir).unwrap();
    // A missing meta file.
    fs::remove_file(&meta).unwrap();
    assert!(
        open_err(tmp.path())
            .to_string()
            .contains(&meta.display().to_string())
    );
    fs::write(&meta, &good).unwrap();
    // An image of the wrong length.
    let data = dir.join(snapshot::DATA_FILE);
    fs::write(&data, b"imag").unwrap();
    assert_corrupt_at(&open_err(tmp.path()), &data, 0);
    fs::write(&data, b"image").unwrap();
    assert_eq!(open(tmp.path()).1.snapshot, Some(snap(10, 1)));
}

#[test]
fn snapshot_image_checksum_is_checked_on_read() {
    let tmp = TempDir::new().unwrap();
    let (mut st, _) = open(tmp.path());
    st.append(&ents(1, 10, 1)).unwrap();
    let meta = snap(10, 1);
    st.save_snapshot(&meta, b"the image").unwrap();
    let data = st.snapshot_path(&meta).join(snapshot::DATA_FILE);
    flip_bit(&data, 4, 0);
    let err = st.read_snapshot_data(&meta).unwrap_err();
    assert!(matches!(
        err,
        StorageError::Corrupt {
            kind: Corruption::SnapshotDataChecksum { .. },
            ..
        }
    ));
    let mut out = Vec::new();
    let err = st
        .open_snapshot(&meta)
        .unwrap()
        .read_to_end(&mut out)
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
}

#[test]
fn streaming_snapshot_round_trip() {
    let tmp = TempDir::new().unwrap();
    let (mut st, _) = open(tmp.path());
    st.append(&ents(1, 10, 1)).unwrap();
    let meta = snap(10, 1);
    let image: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut w = st.snapshot_writer(&meta).unwrap();
    // The writer may be filled on another thread.
    let w = std::thread::scope(|s| {
        s.spawn(|| {
            for chunk in image.chunks(65_536) {
                w.write_all(chunk).unwrap();
            }
            w
        })
        .join()
        .unwrap()
    });
    assert_eq!(w.len(), image.len() as u64);
    st.finish_snapshot(w).unwrap();
    drop(st);
    let (st, _) = open(tmp.path());
    let mut r = st.open_snapshot(&meta).unwrap();
    assert_eq!(r.data_len(), image.len() as u64);
    let mut out = Vec::new();
    r.read_to_end(&mut out).unwrap();
    assert!(out == image);

    // An abandoned writer leaves nothing behind.
    let w = st.snapshot_writer(&snap(11, 1)).unwrap();
    let tmp_dir = w.tmp_dir.clone();
    assert!(tmp_dir.exists());
    drop(w);
    assert!(!tmp_dir.exists());
}

// ---- group commit --------------------------------------------------------

#[test]
fn one_fsync_per_sync_and_stats() {
    let tmp = TempDir::new().unwrap();
    let (mut st, _) = Storage::open(tmp.path(), StorageOptions::default()).unwrap();
    let base = st.stats();
    for i in 1..=100 {
        st.append(&[ent(i, 1)]).unwrap();
    }
    assert_eq!(st.stats().fsyncs, base.fsyncs, "append does not sync");
    assert_eq!(st.sync().unwrap(), 100);
    let s = st.stats();
    assert_eq!(s.fsyncs, base.fsyncs + 1);
    assert_eq!(s.wal_syncs, 1);
    assert_eq!(s.entries_written, 100);
    assert!(s.bytes_written > 100 * 8);
    st.sync().unwrap();
    assert_eq!(st.stats().fsyncs, base.fsyncs + 1, "nothing new, no fsync");
}

#[test]
fn sync_can_run_on_another_thread_while_appending() {
    fn assert_send<T: Send>() {}
    assert_send::<Storage>();
    assert_send::<SyncJob>();
    assert_send::<SyncDone>();
    assert_send::<SnapshotWriter>();
    assert_send::<SnapshotReader>();

    let tmp = TempDir::new().unwrap();
    let (mut st, _) = open(tmp.path());
    st.append(&ents(1, 5, 1)).unwrap();
    let job = st.begin_sync().unwrap();
    assert_eq!(job.last_index(), 5);
    let handle = std::thread::spawn(move || job.run());
    st.append(&ents(6, 9, 1)).unwrap();
    let done = handle.join().unwrap();
    assert_eq!(st.finish_sync(done).unwrap(), 5);
    // The whole storage can move to a blocking thread too.
    let st = std::thread::spawn(move || {
        st.sync().unwrap();
        st
    })
    .join()
    .unwrap();
    assert_eq!(st.stats().wal_syncs, 2);
    assert_eq!(
        st.active.seg.synced_len, st.active.seg.len,
        "the second sync covered everything"
    );
}

// ---- simulated crashes ---------------------------------------------------

/// What the files would hold after a power failure now: each segment keeps
/// what was synced plus an arbitrary prefix of the rest (`zeros`: the rest
/// keeps its length but reads as zeros, as after a size update without the
/// data). Everything else the storage writes is durable on return.
fn crash(st: Storage, rng: &mut SplitMix64, zeros: bool) {
    let wal_dir = st.wal_dir.clone();
    let segs: Vec<Segment> = st
        .sealed
        .iter()
        .chain(std::iter::once(&st.active.seg))
        .cloned()
        .collect();
    drop(st);
    for seg in segs {
        assert!(seg.synced_len <= seg.len);
        if seg.synced_len == seg.len {
            continue;
        }
        let path = wal_dir.join(seg.name());
        let keep = rng.range(seg.synced_len, seg.len + 1);
        if zeros {
            let mut bytes = fs::read(&path).unwrap();
            bytes[keep as usize..].fill(0);
            fs::write(&path, bytes).unwrap();
        } else {
            truncate(&path, keep);
        }
    }
}

#[test]
fn crash_loses_only_unsynced_entries() {
    for seed in 0..40u64 {
        let mut rng = SplitMix64::new(seed);
        let tmp = TempDir::new().unwrap();
        let (mut st, _) = open(tmp.path());
        // The log after each record written; `durable` is the number of
        // records that a sync covered.
        let mut history: Vec<Vec<Entry>> = vec![Vec::new()];
        let mut log: Vec<Entry> = Vec::new();
        let mut durable = 0;
        let mut term = 1;
        let mut hs = HardState::default();
        for _ in 0..rng.range(5, 40) {
            let last = log.len() as u64;
            let from = if last > 3 && rng.range(0, 5) == 0 {
                term += 1;
                rng.range(last - 3, last + 1)
            } else {
                last + 1
            };
            let batch: Vec<Entry> = (from..from + rng.range(1, 6))
                .map(|i| Entry {
                    term,
                    index: i,
                    payload: EntryPayload::Normal(
                        vec![seed as u8; rng.range(0, 60) as usize].into(),
                    ),
                })
                .collect();
            st.append(&batch).unwrap();
            for e in &batch {
                log.truncate(e.index as usize - 1);
                log.push(e.clone());
                history.push(log.clone());
            }
            if rng.range(0, 3) == 0 {
                st.sync().unwrap();
                durable = history.len() - 1;
            }
            if rng.range(0, 4) == 0 {
                hs = HardState {
                    term,
                    vote: Some(rng.range(1, 4)),
                    commit: log.len() as u64 / 2,
                };
                st.set_hard_state(hs).unwrap();
            }
        }
        let durable_hs = st.durable_hard_state();
        assert_eq!((durable_hs.term, durable_hs.vote), (hs.term, hs.vote));
        crash(st, &mut rng, seed % 2 == 1);

        let (mut st, rec) = open(tmp.path());
        let found = history[durable..].iter().position(|h| *h == rec.entries);
        assert!(
            found.is_some(),
            "seed {seed}: recovered {} entries, not a state at or after the last sync",
            rec.entries.len()
        );
        assert_eq!(rec.hard_state, durable_hs, "seed {seed}");
        // The recovered log carries on.
        let next = rec.entries.len() as u64 + 1;
        st.append(&[ent(next, term + 1)]).unwrap();
        st.close().unwrap();
        let (_, again) = open(tmp.path());
        assert_eq!(again.entries.len() as u64, next, "seed {seed}");
        assert_eq!(again.entries[..rec.entries.len()], rec.entries[..]);
    }
}

/// Random operations against a model of what must be recovered, with clean
/// reopens and crashes after a sync in between.
#[test]
fn random_operations_match_a_model() {
    for seed in 100..120u64 {
        let mut rng = SplitMix64::new(seed);
        let tmp = TempDir::new().unwrap();
        let opts = StorageOptions {
            segment_size: 300,
            ..StorageOptions::default()
        };
        let (mut st, _) = Storage::open(tmp.path(), opts.clone()).unwrap();
        let mut snapshot: Option<SnapshotMeta> = None;
        let mut log: Vec<Entry> = Vec::new(); // after the snapshot
        let mut term = 1;
        for step in 0..120 {
            let snap_index = snapshot.as_ref().map_or(0, |m| m.index);
            let last = snap_index + log.len() as u64;
            match rng.range(0, 20) {
                0..=11 => {
                    let from = if log.len() > 2 && rng.range(0, 4) == 0 {
                        term += 1;
                        rng.range(last - 2, last + 1).max(snap_index + 1)
                    } else {
                        last + 1
                    };
                    let batch: Vec<Entry> = (from..from + rng.range(1, 8))
                        .map(|i| ent(i, term))
                        .collect();
                    st.append(&batch).unwrap();
                    log.truncate((from - snap_index - 1) as usize);
                    log.extend(batch);
                }
                12..=13 if !log.is_empty() => {
                    // A local snapshot somewhere in the log, then compaction.
                    let at = rng.range(0, log.len() as u64) as usize;
                    let meta = snap(log[at].index, log[at].term);
                    st.save_snapshot(&meta, &meta.index.to_le_bytes()).unwrap();
                    log.drain(..=at);
                    snapshot = Some(meta.clone());
                    st.compact(meta.index.saturating_sub(rng.range(0, 10)))
                        .unwrap();
                }
                14 => {
                    // A snapshot from the leader, beyond or conflicting.
                    term += 1;
                    let meta = snap(last + rng.range(0, 5), term);
                    st.save_snapshot(&meta, b"leader").unwrap();
                    log.clear();
                    snapshot = Some(meta);
                }
                15..=16 => {
                    st.close().unwrap();
                    let (s, rec) = Storage::open(tmp.path(), opts.clone()).unwrap();
                    assert_eq!(rec.entries, log, "seed {seed} step {step}");
                    assert_eq!(rec.snapshot, snapshot, "seed {seed} step {step}");
                    st = s;
                }
                17 => {
                    st.sync().unwrap();
                    crash(st, &mut rng, false);
                    let (s, rec) = Storage::open(tmp.path(), opts.clone()).unwrap();
                    assert_eq!(rec.entries, log, "seed {seed} step {step}");
                    st = s;
                }
                _ => {
                    st.sync().unwrap();
                }
            }
            assert_eq!(
                st.last_index(),
                snapshot.as_ref().map_or(0, |m| m.index) + log.len() as u64
            );
        }
        // Compaction kept the segments bounded.
        let live = segments(tmp.path()).len();
        let bytes: u64 = log.iter().map(|e| e.size() + 16).sum();
        assert!(
            live as u64 <= 3 + 2 * bytes / 300 + 10,
            "seed {seed}: {live} segments"
        );
    }
}

// ---- with the core -------------------------------------------------------

/// A single-node group driven through the storage, restarted from what it
/// recovered.
#[test]
fn drives_a_raft_node_across_restarts() {
    let tmp = TempDir::new().unwrap();
    let mut applied: Vec<Vec<u8>> = Vec::new();

    fn run(node: &mut Raft, st: &mut Storage, applied: &mut Vec<Vec<u8>>) {
        while node.has_ready() {
            let rd = node.ready();
            if let Some(meta) = &rd.snapshot {
                st.save_snapshot(meta, b"").unwrap();
            }
            st.append(&rd.entries).unwrap();
            if let Some(hs) = rd.hard_state {
                st.set_hard_state(hs).unwrap();
            }
            st.sync().unwrap();
            for e in &rd.committed_entries {
                if let Some(d) = e.data() {
                    applied.push(d.to_vec());
                }
            }
            node.advance();
        }
    }

    let (mut st, rec) = open(tmp.path());
    let mut node = Raft::new(
        Config::new(1),
        rec.into_initial_state(ConfState::with_voters([1])),
    )
    .unwrap();
    node.campaign();
    for i in 0..20u8 {
        node.propose(vec![i]).unwrap();
        run(&mut node, &mut st, &mut applied);
    }
    assert_eq!(applied.len(), 20);
    let (term, last) = (node.term(), node.last_index());
    // Snapshot and compact at 15, then crash (no close).
    let meta = node.compact(15).unwrap();
    st.save_snapshot(&meta, &[15]).unwrap();
    st.compact(meta.index).unwrap();
    drop(st);

    let (mut st, rec) = open(tmp.path());
    assert_eq!(rec.snapshot.as_ref().map(|m| m.index), Some(15));
    assert_eq!(rec.hard_state.term, term);
    let mut node = Raft::new(
        Config::new(1),
        rec.into_initial_state(ConfState::with_voters([1])),
    )
    .unwrap();
    assert_eq!(node.last_index(), last);
    assert_eq!(node.term(), term);
    node.campaign();
    node.propose(vec![99]).unwrap();
    let mut after = Vec::new();
    run(&mut node, &mut st, &mut after);
    assert_eq!(after.last(), Some(&vec![99]));
    st.close().unwrap();
    let (_, rec) = open(tmp.path());
    assert_eq!(rec.entries.last().and_then(|e| e.data()), Some(&[99u8][..]));
}

// ---- file modes -------------------------------------------------------------

/// Every directory under `dir` with its mode, and every file with its.
#[cfg(unix)]
fn modes(dir: &Path, out: &mut Vec<(PathBuf, u32)>) {
    use std::os::unix::fs::PermissionsExt;
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let mode = e.metadata().unwrap().permissions().mode() & 0o7777;
        out.push((e.path(), mode));
        if e.file_type().unwrap().is_dir() {
            modes(&e.path(), out);
        }
    }
}

/// The log holds every command of the application: nothing storage writes
/// may be readable by other users, and a directory left open (by an older
/// version, say) is closed.
#[cfg(unix)]
#[test]
fn everything_storage_writes_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("raft");
    fs::create_dir(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    let (mut st, _) = open(&dir);
    st.append(&ents(1, 60, 1)).unwrap();
    st.set_hard_state(HardState {
        term: 2,
        vote: Some(1),
        commit: 60,
    })
    .unwrap();
    st.save_snapshot(&snap(50, 1), b"image").unwrap();
    st.compact(50).unwrap();
    // A snapshot from the leader beyond the log restarts it.
    st.save_snapshot(&snap(100, 2), b"newer image").unwrap();
    st.close().unwrap();
    let (st, _) = open(&dir);
    drop(st);

    let root = fs::metadata(&dir).unwrap().permissions().mode() & 0o7777;
    assert_eq!(root, 0o700, "the storage directory");
    let mut all = Vec::new();
    modes(&dir, &mut all);
    assert!(all.iter().any(|(p, _)| p.ends_with("hardstate")), "{all:?}");
    assert!(all.iter().any(|(p, _)| p.ends_with("data")), "{all:?}");
    for (path, mode) in all {
        let want = if path.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode, want, "{} is {mode:o}", path.display());
    }
}

/// The names in `dir`, sorted.
fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// `data` as the image of a snapshot at `meta`, prepared beside `st`
/// (made durable, not yet registered).
fn prepared(st: &Storage, meta: &SnapshotMeta, data: &[u8]) -> PreparedSnapshot {
    let prepare = st.snapshot_preparer();
    prepare(meta, staged(st, data)).unwrap()
}

/// An image written into a staged file in the storage's staging directory.
fn staged(st: &Storage, data: &[u8]) -> crate::image::StagedImage {
    let mut s = crate::image::StagedImage::create_in(st.staging_dir()).unwrap();
    s.write_all(data).unwrap();
    s.seal().unwrap();
    s
}

/// A prepared snapshot is stored only once registered: one the core did
/// not take (PBFT's stable checkpoint moved on meanwhile) and never
/// registered — discarded, or the process died before — is not found as
/// the latest snapshot on the next open (the core could not start from
/// it), and its files go.
#[test]
fn a_prepared_snapshot_that_was_not_registered_is_not_recovered() {
    let tmp = TempDir::new().unwrap();
    let (mut st, _) = open(tmp.path());
    st.append(&ents(1, 60, 1)).unwrap();
    st.sync().unwrap();
    let kept = prepared(&st, &snap(20, 1), b"image at 20");
    st.register_snapshot(kept).unwrap();
    st.compact_behind(10).unwrap();
    // Discarded: its files go at once.
    let discarded = prepared(&st, &snap(40, 1), b"image at 40");
    st.discard_snapshot(discarded);
    // Never registered: the process dies with it prepared.
    let orphan = prepared(&st, &snap(50, 1), b"image at 50");
    drop(st);
    drop(orphan);

    let (st, rec) = open(tmp.path());
    assert_eq!(rec.snapshot, Some(snap(20, 1)));
    assert_eq!(rec.entries, ents(21, 60, 1));
    assert_eq!(st.read_snapshot_data(&snap(20, 1)).unwrap(), b"image at 20");
    let names = names_in(&tmp.path().join(SNAPSHOT_DIR));
    assert_eq!(names, vec![snapshot::dir_name(20, 1)]);
}

#[test]
fn a_snapshot_prepared_beside_the_storage_is_registered_and_recovered() {
    let tmp = TempDir::new().unwrap();
    let (mut st, _) = open(tmp.path());
    st.append(&ents(1, 60, 1)).unwrap();
    st.sync().unwrap();
    let prepare = st.snapshot_preparer();
    // Prepared on another thread while the storage goes on.
    let image = staged(&st, b"image at 40");
    let forty = std::thread::spawn(move || prepare(&snap(40, 1), image))
        .join()
        .unwrap()
        .unwrap();
    st.append(&ents(61, 70, 1)).unwrap();
    let stored = st.register_snapshot(forty).unwrap();
    assert_eq!(st.snapshot(), Some(&snap(40, 1)));
    let mut back = Vec::new();
    stored.open().unwrap().read_to_end(&mut back).unwrap();
    assert_eq!(back, b"image at 40");
    let before = segments(tmp.path()).len();
    st.compact_behind(30).unwrap();
    // No staged file is left behind.
    let names = names_in(st.staging_dir());
    assert_eq!(names, vec![snapshot::dir_name(40, 1)]);

    // One behind the latest is refused, and its files go.
    let stale = prepared(&st, &snap(35, 1), b"stale");
    assert!(matches!(
        st.register_snapshot(stale),
        Err(StorageError::StaleSnapshot { index: 35, .. })
    ));
    st.close().unwrap();
    let names = names_in(&tmp.path().join(SNAPSHOT_DIR));
    assert_eq!(names, vec![snapshot::dir_name(40, 1)]);

    // The compacted segments are gone; the rest of the log and the
    // snapshot come back.
    let after = segments(tmp.path()).len();
    assert!(after < before, "{after} segments of {before} left");
    let (st, rec) = open(tmp.path());
    assert_eq!(rec.snapshot, Some(snap(40, 1)));
    assert_eq!(rec.entries, ents(41, 70, 1));
    assert_eq!(st.read_snapshot_data(&snap(40, 1)).unwrap(), b"image at 40");
}

// ---- arbitrary bytes -----------------------------------------------------

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// A record with a valid header and checksum around `payload`, so the
/// decoder itself meets what follows.
fn framed(payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Between `lo` and `hi` (exclusive) arbitrary bytes.
fn random_bytes(rng: &mut SplitMix64, lo: u64, hi: u64) -> Vec<u8> {
    let len = rng.range(lo, hi);
    (0..len).map(|_| rng.next_u64() as u8).collect()
}

/// Files on disk after a crash are hostile input too: seeded cases put
/// arbitrary bytes in the segments, the hard state, the snapshot metadata
/// and images — replacing a whole file, overwriting a range, or appending a
/// record whose checksum is right around an arbitrary (or huge-length)
/// payload, so the decoder, not only the checksum, meets it. Opening never
/// panics: it recovers (a contiguous log, within what was written) or
/// returns an error.
#[test]
fn arbitrary_bytes_in_any_file_never_panic_recovery() {
    let (base, _) = written(60);
    {
        let (mut st, _) = open(base.path());
        st.save_snapshot(&snap(30, 1), b"the state at 30").unwrap();
        st.compact(30).unwrap();
        st.close().unwrap();
    }
    let mut rng = SplitMix64::new(0xf11e_5eed);
    let (mut recovered, mut refused) = (0, 0);
    for case in 0..400 {
        let tmp = TempDir::new().unwrap();
        copy_tree(base.path(), tmp.path());
        let files = files_under(tmp.path());
        let file = &files[rng.range(0, files.len() as u64) as usize];
        let mut bytes = fs::read(file).unwrap();
        match rng.range(0, 5) {
            0 => bytes = random_bytes(&mut rng, 0, 300),
            1 if !bytes.is_empty() => {
                let at = rng.range(0, bytes.len() as u64) as usize;
                let n = rng.range(1, 40) as usize;
                let junk = random_bytes(&mut rng, n as u64, n as u64 + 1);
                for (i, b) in junk.into_iter().enumerate() {
                    if let Some(slot) = bytes.get_mut(at + i) {
                        *slot = b;
                    }
                }
            }
            2 => {
                let payload = random_bytes(&mut rng, 1, 64);
                bytes.extend_from_slice(&framed(&payload));
            }
            3 => {
                // A plausible prefix claiming an enormous length.
                let mut payload = vec![rng.range(0, 4) as u8];
                payload.extend_from_slice(&[0xff; 9]);
                payload.extend_from_slice(&random_bytes(&mut rng, 8, 9));
                bytes.extend_from_slice(&framed(&payload));
            }
            _ => {
                let cut = rng.range(0, bytes.len() as u64 + 1) as usize;
                bytes.truncate(cut);
                let payload = random_bytes(&mut rng, 1, 32);
                bytes.extend_from_slice(&framed(&payload));
            }
        }
        fs::write(file, &bytes).unwrap();
        let dir = tmp.path().to_path_buf();
        let opened = std::panic::catch_unwind(|| Storage::open(&dir, small()));
        match opened {
            Err(_) => panic!(
                "case {case}: opening panicked after damage to {}",
                file.display()
            ),
            Ok(Ok((_, rec))) => {
                recovered += 1;
                for w in rec.entries.windows(2) {
                    assert_eq!(w[0].index + 1, w[1].index, "case {case}");
                }
                assert!(
                    rec.entries.last().is_none_or(|e| e.index <= 60),
                    "case {case}"
                );
            }
            Ok(Err(e)) => {
                refused += 1;
                assert!(!e.to_string().is_empty());
            }
        }
    }
    eprintln!("{recovered} recovered, {refused} refused");
    // Both outcomes occur, so the cases reach past the checksum.
    assert!(
        recovered > 20 && refused > 20,
        "{recovered} recovered, {refused} refused"
    );
}

/// Entries hold their bytes shared (`Bytes`) since the engines stopped
/// copying payloads; logs and peers written before encode a `Vec<u8>`.
/// Both must read the other's bytes: the encoding is the same.
#[test]
fn an_entry_is_encoded_as_it_was_when_its_payload_was_a_vec() {
    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    enum OldPayload {
        Empty,
        Normal(Vec<u8>),
    }
    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct OldEntry {
        term: u64,
        index: u64,
        payload: OldPayload,
    }
    let data: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
    let new = Entry {
        term: 9,
        index: 70_000,
        payload: EntryPayload::Normal(data.clone().into()),
    };
    let old = OldEntry {
        term: 9,
        index: 70_000,
        payload: OldPayload::Normal(data),
    };
    let new_bytes = postcard::to_allocvec(&new).expect("encodes");
    let old_bytes = postcard::to_allocvec(&old).expect("encodes");
    assert_eq!(new_bytes, old_bytes);
    let read: Entry = postcard::from_bytes(&old_bytes).expect("decodes");
    assert_eq!(read, new);
    let back: OldEntry = postcard::from_bytes(&new_bytes).expect("decodes");
    assert_eq!(back, old);
}

/// Background removals run one after another, in the order they were
/// started: two compactions' segment removals overtaking each other could
/// leave a newer segment removed and an older one not — after a crash, a
/// gap in the log that open refuses. And after one fails, the later ones
/// remove nothing (a gap again, otherwise).
#[test]
fn background_removals_run_in_order_and_stop_after_a_failure() {
    let tmp = TempDir::new().unwrap();
    let (mut st, _) = open(tmp.path());
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (release, held) = std::sync::mpsc::channel::<()>();
    let o = order.clone();
    st.in_background(move || {
        held.recv().unwrap();
        o.lock().unwrap().push(1);
        Ok(())
    });
    let o = order.clone();
    let (ran, second) = std::sync::mpsc::channel::<()>();
    st.in_background(move || {
        o.lock().unwrap().push(2);
        ran.send(()).unwrap();
        Ok(())
    });
    // The second waits for the first, however long it takes.
    assert!(
        second
            .recv_timeout(std::time::Duration::from_millis(200))
            .is_err(),
        "the second job ran before the first"
    );
    release.send(()).unwrap();
    st.wait_background();
    assert_eq!(*order.lock().unwrap(), [1, 2]);

    st.in_background(|| {
        Err(StorageError::Io {
            op: "remove",
            path: PathBuf::from("x"),
            source: std::io::Error::other("refused"),
        })
    });
    let o = order.clone();
    st.in_background(move || {
        o.lock().unwrap().push(3);
        Ok(())
    });
    st.wait_background();
    assert_eq!(*order.lock().unwrap(), [1, 2], "skipped after the failure");
}

/// A snapshot prepared here and, meanwhile, the same one (index and term)
/// installed from a peer: registering keeps the stored one and removes
/// what was prepared (the rename into place used to fail on the existing
/// directory, leaving the prepared one behind).
#[test]
fn registering_a_snapshot_installed_meanwhile_keeps_the_installed_one() {
    let tmp = TempDir::new().unwrap();
    let (mut st, _) = open(tmp.path());
    st.append(&ents(1, 30, 1)).unwrap();
    st.sync().unwrap();
    let built = prepared(&st, &snap(20, 1), b"built here");
    let image = staged(&st, b"from a peer");
    st.install_snapshot_image(&snap(20, 1), image, &ents(21, 22, 1))
        .unwrap();
    let stored = st.register_snapshot(built).unwrap();
    let mut back = Vec::new();
    stored.open().unwrap().read_to_end(&mut back).unwrap();
    assert_eq!(back, b"from a peer");
    st.close().unwrap();
    let names = names_in(&tmp.path().join(SNAPSHOT_DIR));
    assert_eq!(names, vec![snapshot::dir_name(20, 1)]);
}
