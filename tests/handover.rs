//! Live update: a store handed to another owner over a Unix socket. In-process
//! tests run the sender and the receiver on two threads of this process; the cross-process
//! ones re-execute this binary as the other process (the ignored `handover_child` test) on
//! real 1 GiB hugetlb pages where the machine can give them (else they report themselves
//! skipped).

mod common;

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, mpsc};

use common::*;
use pfnstore::core::{Geometry, Pfn};
use pfnstore::handover::{HandoverError, Received};
use pfnstore::hugetlb::fd_passing::{recv_with_fd, send_with_fd};
use pfnstore::hugetlb::pool::{PoolCounts, PoolId, Sysfs, ledger_entries};
use pfnstore::hugetlb::{
    HugePageSize, HugetlbConfig, HugetlbError, HugetlbSource, MemorySource, PfnKind, Prefault,
    SyntheticSource,
};
use pfnstore::subscribers::{IommuMapper, Misbehaviour};
use pfnstore::{
    AttributeRun, Change, ChangeKind, ConvertMode, FileExtent, FileOptions, GuestFile, Interest,
    PinOwner, Shareability, Store, StoreError, StoreOptions, Subscriber, UnmapError,
};

const MIB: u64 = 1 << 20;

/// Everything observable about a store: each file's attribute runs, extents (frames and
/// memfd offsets), a digest of its shared bytes, and the allocator's totals.
#[derive(Debug, PartialEq, Eq)]
struct Dump {
    files: Vec<FileDump>,
    allocator: (u64, u64, u64, u64),
}

/// One file of a [`Dump`].
#[derive(Debug, PartialEq, Eq)]
struct FileDump {
    id: pfnstore::FileId,
    size: u64,
    attributes: Vec<AttributeRun>,
    extents: Vec<FileExtent>,
    shared_digest: u64,
}

fn digest(file: &GuestFile) -> u64 {
    if !file.store().has_host_memory() {
        return 0;
    }
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    let mut page = vec![0u8; PAGE as usize];
    for run in file.attribute_runs(0, file.size()).unwrap() {
        if run.shareability != Shareability::Shared || !run.backed || run.quarantined.is_some() {
            continue;
        }
        for p in run.range.pages() {
            file.read(p.byte(), &mut page).unwrap();
            for b in &page {
                hash = (hash ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
            }
        }
    }
    hash
}

fn dump(store: &Store, files: &[GuestFile]) -> Dump {
    let t = store.stats().allocator.total;
    Dump {
        files: files
            .iter()
            .map(|f| FileDump {
                id: f.id(),
                size: f.size(),
                attributes: f.attribute_runs(0, f.size()).unwrap(),
                extents: f.extents().unwrap(),
                shared_digest: digest(f),
            })
            .collect(),
        allocator: (
            t.free_pages,
            t.allocated_pages,
            t.quarantined_pages,
            t.dirty_pages,
        ),
    }
}

/// A store's life before the handover: shared memory with patterns, a 4 KiB page and a
/// 2 MiB range made private inside a huge block, a pinned range, a quarantined range (a
/// device that could neither unmap nor map back), a punched range (dirty memory), and a
/// second, partly backed private file.
fn live_a_little(store: &Store, unit: u64) -> Vec<GuestFile> {
    let a = store
        .create_file(FileOptions::new(4 * unit).shared().populated())
        .unwrap();
    if store.has_host_memory() {
        for i in 0..64u64 {
            let offset = i * (4 * unit / 64) + 123;
            a.write(offset, format!("page {i} of file a").as_bytes())
                .unwrap();
        }
    }
    a.convert(
        unit + 5 * PAGE,
        PAGE,
        Shareability::Private,
        ConvertMode::Preserve,
    )
    .unwrap();
    a.convert(
        2 * unit,
        2 * MIB,
        Shareability::Private,
        ConvertMode::Preserve,
    )
    .unwrap();
    a.pin(3 * unit, 8 * PAGE, PinOwner(42)).unwrap();
    let flaky = Arc::new(IommuMapper::new("flaky", store.geometry()));
    let quarantined = pages(unit / PAGE + 100, unit / PAGE + 104);
    flaky.inject(Misbehaviour::fail_unmap(quarantined, true));
    let registration = store.subscribe(&dyn_sub(&flaky), Interest::All).unwrap();
    let failed = a.convert(
        unit + 100 * PAGE,
        4 * PAGE,
        Shareability::Private,
        ConvertMode::Preserve,
    );
    assert!(
        matches!(&failed, Err(StoreError::UnmapFailed { quarantined, .. }) if !quarantined.is_empty()),
        "{failed:?}"
    );
    drop(registration);
    a.punch_hole(3 * unit + unit / 2, unit / 4).unwrap();
    let b = store.create_file(FileOptions::new(2 * unit)).unwrap();
    b.populate(unit / 2, unit / 2).unwrap();
    b.convert(unit / 2, 4 * PAGE, Shareability::Shared, ConvertMode::Zero)
        .unwrap();
    store.check_invariants().unwrap();
    vec![a, b]
}

fn ordinary_store(bytes: u64) -> Store {
    let source = HugetlbSource::new(
        HugetlbConfig::new(bytes)
            .with_page_size(HugePageSize::Base4K)
            .with_strict(true)
            .with_prefault(Prefault::None),
    )
    .unwrap();
    Store::from_hugetlb(source, StoreOptions::default().with_shards(2)).unwrap()
}

/// Hands `store` over on a socket pair, the receiver on another thread.
fn hand_over_in_process(
    store: &Store,
) -> (
    Result<pfnstore::handover::HandoverReport, HandoverError>,
    Result<Received, HandoverError>,
) {
    let (tx, rx) = UnixStream::pair().unwrap();
    let receiver =
        std::thread::spawn(move || Store::receive(&rx, StoreOptions::default().with_shards(1)));
    let sent = store.hand_over(&tx);
    (sent, receiver.join().unwrap())
}

#[test]
fn a_synthetic_store_survives_a_snapshot_round_trip() {
    let source = SyntheticSource::new(Geometry::X86_64, Pfn(1 << 20), 16).unwrap();
    let store = Store::synthetic(source, StoreOptions::default()).unwrap();
    let files = live_a_little(&store, GIB);
    let before = dump(&store, &files);
    let bytes = store.snapshot().unwrap();
    assert!(
        bytes.len() < 4096,
        "{} bytes for a 16 GiB store",
        bytes.len()
    );
    // The store is live again after a snapshot.
    files[0]
        .convert(0, PAGE, Shareability::Private, ConvertMode::Preserve)
        .unwrap();
    files[0]
        .convert(0, PAGE, Shareability::Shared, ConvertMode::Preserve)
        .unwrap();
    let received = Store::receive_snapshot(&bytes, None, StoreOptions::default()).unwrap();
    assert_eq!(dump(&received.store, &received.files), before);
    // The rebuilt store works like the original: the pin still refuses, conversions go on.
    let a = &received.files[0];
    assert!(matches!(
        a.convert(3 * GIB, PAGE, Shareability::Private, ConvertMode::Preserve),
        Err(StoreError::Pinned {
            owner: PinOwner(42),
            ..
        })
    ));
    a.convert(
        GIB / 2,
        2 * MIB,
        Shareability::Private,
        ConvertMode::Preserve,
    )
    .unwrap();
    received.store.check_invariants().unwrap();
}

#[test]
fn a_store_with_memory_is_handed_over_and_the_old_handles_are_closed() {
    let store = ordinary_store(GIB);
    let files = live_a_little(&store, 64 * MIB);
    let before = dump(&store, &files);
    let (sent, received) = hand_over_in_process(&store);
    let report = sent.unwrap();
    let received = received.unwrap();
    assert!(report.snapshot_bytes > 0 && report.snapshot_bytes < 64 * 1024);
    // Every handle of the old store answers HandedOver.
    assert_eq!(files[0].pfn_at(0).unwrap_err(), StoreError::HandedOver);
    assert_eq!(
        files[1]
            .convert(0, PAGE, Shareability::Shared, ConvertMode::Preserve)
            .unwrap_err(),
        StoreError::HandedOver
    );
    assert_eq!(
        store.create_file(FileOptions::new(PAGE)).unwrap_err(),
        StoreError::HandedOver
    );
    assert!(matches!(
        store.snapshot(),
        Err(HandoverError::Store(StoreError::HandedOver))
    ));
    // The old store gives nothing back when it goes: the new one sees the same memory.
    drop(files);
    drop(store);
    assert_eq!(dump(&received.store, &received.files), before);
    let a = &received.files[0];
    a.write(100, b"still here").unwrap();
    let mut buf = [0u8; 10];
    a.read(100, &mut buf).unwrap();
    assert_eq!(&buf, b"still here");
    received.store.check_invariants().unwrap();
}

#[test]
fn subscribers_register_again_and_get_the_replay() {
    let store = ordinary_store(GIB);
    let _files = live_a_little(&store, 64 * MIB);
    let (sent, received) = hand_over_in_process(&store);
    sent.unwrap();
    let received = received.unwrap();
    let recorder = Recorder::new("new-vmm");
    let _reg = received
        .store
        .subscribe(&dyn_sub(&recorder), Interest::All)
        .unwrap();
    let replays: Vec<_> = recorder
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::Map(pfnstore::ChangeKind::Replay, plan) => Some(plan),
            _ => None,
        })
        .collect();
    assert_eq!(replays.len(), 2, "one replay per backed file");
    for (plan, file) in replays.iter().zip(&received.files) {
        assert_eq!(plan, &file.current_plan().unwrap());
    }
}

/// Forwards the sender's snapshot to the receiver after `damage` changed it, and the answer
/// back: a proxy between the two ends of a handover.
fn through_a_proxy(
    store: &Store,
    damage: fn(&mut Vec<u8>),
) -> (
    Result<pfnstore::handover::HandoverReport, HandoverError>,
    Result<Received, HandoverError>,
) {
    let (tx, proxy_in) = UnixStream::pair().unwrap();
    let (proxy_out, rx) = UnixStream::pair().unwrap();
    let proxy = std::thread::spawn(move || {
        let mut header = [0u8; 8];
        let (n, fd) = recv_with_fd(&proxy_in, &mut header).unwrap();
        (&proxy_in).read_exact(&mut header[n..]).unwrap();
        let mut bytes = vec![0u8; u64::from_le_bytes(header) as usize];
        (&proxy_in).read_exact(&mut bytes).unwrap();
        damage(&mut bytes);
        send_with_fd(
            &proxy_out,
            &(bytes.len() as u64).to_le_bytes(),
            fd.as_ref().map(|f| f.as_fd()),
        )
        .unwrap();
        (&proxy_out).write_all(&bytes).unwrap();
        let mut answer = Vec::new();
        let _ = (&proxy_out).read_to_end(&mut answer);
        let _ = (&proxy_in).write_all(&answer);
    });
    let receiver = std::thread::spawn(move || {
        let received = Store::receive(&rx, StoreOptions::default().with_shards(1));
        drop(rx);
        received
    });
    let sent = store.hand_over(&tx);
    let received = receiver.join().unwrap();
    proxy.join().unwrap();
    (sent, received)
}

#[test]
fn a_damaged_snapshot_is_refused_and_the_sender_goes_on() {
    let store = ordinary_store(GIB);
    let files = live_a_little(&store, 64 * MIB);
    let before = dump(&store, &files);
    type Damage = fn(&mut Vec<u8>);
    let cases: [(&str, Damage); 4] = [
        ("truncated", |b| b.truncate(b.len() / 2)),
        ("bit flipped", |b| {
            let at = b.len() / 3;
            b[at] ^= 0x10;
        }),
        ("another version", |b| b[8] = 99),
        ("not a snapshot", |b| b[0] = b'X'),
    ];
    for (what, damage) in cases {
        let (sent, received) = through_a_proxy(&store, damage);
        let received = received.map(drop).unwrap_err();
        match what {
            "truncated" => assert!(
                matches!(received, HandoverError::Truncated { .. }),
                "{received}"
            ),
            "bit flipped" => assert!(
                matches!(received, HandoverError::Checksum { .. }),
                "{received}"
            ),
            "another version" => assert!(
                matches!(received, HandoverError::Version { found: 99, .. }),
                "{received}"
            ),
            _ => assert!(
                matches!(received, HandoverError::NotASnapshot),
                "{received}"
            ),
        }
        assert!(
            matches!(sent, Err(HandoverError::Refused(_))),
            "{what}: the sender was told: {sent:?}"
        );
        // The sender goes on as if nothing happened.
        assert_eq!(dump(&store, &files), before, "{what}");
        files[1]
            .convert(0, PAGE, Shareability::Shared, ConvertMode::Preserve)
            .unwrap();
        files[1]
            .convert(0, PAGE, Shareability::Private, ConvertMode::Preserve)
            .unwrap();
    }
    store.check_invariants().unwrap();
}

#[test]
fn a_receiver_that_goes_away_before_confirming_leaves_the_sender_live() {
    let store = ordinary_store(GIB);
    let files = live_a_little(&store, 64 * MIB);
    let before = dump(&store, &files);
    let (tx, rx) = UnixStream::pair().unwrap();
    let receiver = std::thread::spawn(move || {
        // Reads the announcement and dies (the socket closes) before answering.
        let mut header = [0u8; 8];
        let _ = recv_with_fd(&rx, &mut header).unwrap();
    });
    let sent = store.hand_over(&tx);
    receiver.join().unwrap();
    assert!(matches!(sent, Err(HandoverError::ReceiverGone)), "{sent:?}");
    assert_eq!(dump(&store, &files), before);
    files[0].write(0, b"alive").unwrap();
    store.check_invariants().unwrap();
}

#[test]
fn operations_during_a_handover_are_refused_with_a_typed_error() {
    let store = ordinary_store(GIB);
    let files = live_a_little(&store, 64 * MIB);
    let (tx, rx) = UnixStream::pair().unwrap();
    let file = files[1].clone();
    let (seen_tx, seen_rx) = std::sync::mpsc::channel();
    let receiver = std::thread::spawn(move || {
        let mut header = [0u8; 8];
        let _ = recv_with_fd(&rx, &mut header).unwrap();
        // The sender waits for the answer now: its store refuses operations.
        seen_tx.send(file.pfn_at(0)).unwrap();
        drop(rx);
    });
    let sent = store.hand_over(&tx);
    receiver.join().unwrap();
    assert_eq!(seen_rx.recv().unwrap(), Err(StoreError::HandoverInProgress));
    assert!(matches!(sent, Err(HandoverError::ReceiverGone)));
    assert!(files[1].pfn_at(0).is_ok(), "live again");
}

/// A subscriber that holds the first conversion it is told to unmap until the test releases
/// it: an operation under way (inside the gate) for as long as the test wants.
struct HoldsAConversion {
    /// Told once, when the conversion is held.
    held: Mutex<Option<mpsc::Sender<()>>>,
    /// What the held conversion waits for.
    release: Mutex<mpsc::Receiver<()>>,
}

/// Releases the held conversion when dropped: also when the test fails, whose unwinding would
/// otherwise wait forever in the registration's drop for the callback under way.
struct Release(mpsc::Sender<()>);

impl Drop for Release {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

impl Subscriber for HoldsAConversion {
    fn name(&self) -> &str {
        "holds-a-conversion"
    }

    fn unmap(&self, change: &Change<'_>) -> Result<(), UnmapError> {
        if matches!(change.kind, ChangeKind::Convert { .. })
            && let Some(held) = self.held.lock().unwrap().take()
        {
            held.send(()).unwrap();
            self.release.lock().unwrap().recv().unwrap();
        }
        Ok(())
    }

    fn map(&self, _: &Change<'_>) {}

    fn restore(&self, _: &Change<'_>) -> Result<(), UnmapError> {
        Ok(())
    }
}

/// The quiesce waits for an operation already under way: a snapshot taken while a conversion
/// is held inside a subscriber's `unmap` does not return before the conversion ends, and it
/// holds the conversion whole (not the state before it, nor half of it).
#[test]
fn a_snapshot_waits_for_a_conversion_under_way_and_holds_it_whole() {
    let source = SyntheticSource::new(Geometry::X86_64, Pfn(1 << 20), 8).unwrap();
    let store = Store::synthetic(source, StoreOptions::default().with_shards(2)).unwrap();
    let a = store
        .create_file(FileOptions::new(4 * GIB).shared().populated())
        .unwrap();
    let b = store
        .create_file(FileOptions::new(GIB).populated())
        .unwrap();
    let files = [a.clone(), b.clone()];
    let before = dump(&store, &files);
    let (held_tx, held) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    let holder = Arc::new(HoldsAConversion {
        held: Mutex::new(Some(held_tx)),
        release: Mutex::new(release_rx),
    });
    let _registration = store
        .subscribe(&dyn_sub(&holder), Interest::File(a.id()))
        .unwrap();
    let release = Release(release);

    // A: a conversion across a chunk boundary, held in its unmap (inside the gate).
    let converting = std::thread::spawn(move || {
        a.convert(
            GIB - MIB,
            2 * MIB,
            Shareability::Private,
            ConvertMode::Preserve,
        )
        .map(drop)
    });
    held.recv().unwrap();

    // B: a snapshot, which closes the gate and must then wait for A.
    let (snapshot_tx, snapshot) = mpsc::channel();
    let snapshotting = {
        let store = store.clone();
        std::thread::spawn(move || snapshot_tx.send(store.snapshot()).unwrap())
    };
    let returned_early =
        |snapshot: &mpsc::Receiver<Result<Vec<u8>, HandoverError>>| match snapshot.try_recv() {
            Err(mpsc::TryRecvError::Empty) => None,
            Ok(Ok(bytes)) => Some(format!("a snapshot of {} bytes", bytes.len())),
            other => Some(format!("{other:?}")),
        };
    // Until B has closed the gate, another file's operation still runs.
    loop {
        if let Some(early) = returned_early(&snapshot) {
            panic!("the snapshot returned while a conversion was under way: {early}");
        }
        match b.pfn_at(0) {
            Ok(_) => std::thread::yield_now(),
            Err(StoreError::HandoverInProgress) => break,
            Err(e) => panic!("while the gate closes: {e}"),
        }
    }
    // The gate is closed and A is still held: B waits, however long A takes. (The rounds give a
    // gate that does not wait the chance to show it; where it waits, no round can fail.)
    for _ in 0..1000 {
        if let Some(early) = returned_early(&snapshot) {
            panic!("the snapshot returned while a conversion was under way: {early}");
        }
        assert_eq!(
            b.pfn_at(0),
            Err(StoreError::HandoverInProgress),
            "the gate opened again while a conversion was under way"
        );
        std::thread::yield_now();
    }

    drop(release);
    converting.join().unwrap().unwrap();
    // A hang detector only: the snapshot is due as soon as A has ended.
    let bytes = snapshot
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("the snapshot never returned after the conversion ended")
        .unwrap();
    snapshotting.join().unwrap();
    assert!(b.pfn_at(0).is_ok(), "live again after the snapshot");

    let after = dump(&store, &files);
    assert_ne!(after, before, "the conversion changed the store");
    let received = Store::receive_snapshot(&bytes, None, StoreOptions::default()).unwrap();
    assert_eq!(
        dump(&received.store, &received.files),
        after,
        "the snapshot holds the conversion whole"
    );
    let private = received.files[0]
        .attribute_runs(GIB - MIB, 2 * MIB)
        .unwrap();
    assert!(
        private
            .iter()
            .all(|run| run.shareability == Shareability::Private),
        "{private:?}"
    );
}

#[test]
fn snapshots_grow_with_boundaries_not_with_memory() {
    let bytes = |gib: u64, fragment: bool| {
        let source = SyntheticSource::new(Geometry::X86_64, Pfn(1 << 20), gib).unwrap();
        let store = Store::synthetic(source, StoreOptions::default()).unwrap();
        let file = store
            .create_file(FileOptions::new(gib * GIB).populated())
            .unwrap();
        if fragment {
            for i in 0..1000u64 {
                let page = i * 7919 % (gib * GIB / PAGE);
                file.convert(
                    page * PAGE,
                    PAGE,
                    Shareability::Shared,
                    ConvertMode::Preserve,
                )
                .unwrap();
            }
        }
        store.snapshot().unwrap().len() as u64
    };
    // Uniform memory costs a few dozen bytes per GiB (an extent per allocation, whatever its
    // size), far from a record per page; 1,000 converted pages cost two runs each.
    let uniform = bytes(64, false);
    assert!(uniform < 64 * 64, "{uniform} bytes for a uniform 64 GiB");
    let fragmented = bytes(64, true);
    let per_boundary = (fragmented - uniform) / 1000;
    // Two boundaries per converted page, a few bytes each (a per-page record would be 8 or
    // more bytes for every page of the 64 GiB).
    assert!(
        (2..=16).contains(&per_boundary),
        "{per_boundary} bytes per converted page"
    );
}

// ---------------------------------------------------------------------------------------------
// In this process, on real 2 MiB hugetlb pages: the memory of another store is refused.

/// The 2 MiB pool's counters.
fn two_mib_pool() -> PoolCounts {
    let pool = PoolId {
        page_size: HugePageSize::Huge2M,
        node: None,
    };
    Sysfs::system().read_pool(pool).unwrap()
}

/// A store of `bytes` of 2 MiB hugetlb pages, prefaulted (so that its PFNs are real), growing
/// the pool (given back when the store is dropped, also when a test fails); the reason where
/// the machine cannot give them.
fn two_mib_store(bytes: u64) -> Result<Store, String> {
    let source = HugetlbSource::new(
        HugetlbConfig::new(bytes)
            .with_page_size(HugePageSize::Huge2M)
            .with_strict(true)
            .with_grow_pool(true)
            .with_prefault(Prefault::Threads(2)),
    )
    .map_err(|e| format!("{} MiB of 2 MiB pages: {e}", bytes / MIB))?;
    let kind = source.report().pfn_kind;
    if kind != Some(PfnKind::Real) {
        return Err(format!("pagemap gives no real PFNs here ({kind:?})"));
    }
    Store::from_hugetlb(source, StoreOptions::default().with_shards(1)).map_err(|e| e.to_string())
}

/// The hugetlb ledger's entries (what every pool growth is owed from), each with its inode and
/// contents: a growth another owner adopted (and kept) is under another name, with a `from`
/// line.
fn ledger_state() -> Vec<(std::path::PathBuf, u64, String)> {
    ledger_entries(&Sysfs::system())
        .unwrap()
        .into_iter()
        .map(|path| {
            let ino = std::fs::metadata(&path).unwrap().ino();
            let contents = std::fs::read_to_string(&path).unwrap();
            (path, ino, contents)
        })
        .collect()
}

/// The (device, inode) of the store's memfd, as fstat gives it.
fn memfd_identity(store: &Store) -> (u64, u64) {
    let meta = memfd_file(store).metadata().unwrap();
    (meta.dev(), meta.ino())
}

/// CRC-32 (IEEE, reflected), written apart from the crate's, to seal a snapshot the test edits.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// `snapshot` with the memfd identity `from` replaced by `to`, its checksum made good again: a
/// well-formed snapshot that `to`'s memfd passes the identity check with.
fn with_memfd_identity(snapshot: &[u8], from: (u64, u64), to: (u64, u64)) -> Vec<u8> {
    let (body, crc) = snapshot.split_at(snapshot.len() - 4);
    assert_eq!(
        crc32(body).to_le_bytes(),
        crc,
        "the test's CRC-32 is the format's"
    );
    let bytes = |(dev, ino): (u64, u64)| [dev.to_le_bytes(), ino.to_le_bytes()].concat();
    let at: Vec<usize> = body
        .windows(16)
        .enumerate()
        .filter(|(_, w)| *w == bytes(from).as_slice())
        .map(|(i, _)| i)
        .collect();
    assert_eq!(at.len(), 1, "the identity is written once: {at:?}");
    let mut out = body.to_vec();
    out[at[0]..at[0] + 16].copy_from_slice(&bytes(to));
    let crc = crc32(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// A store's snapshot rebuilt over the memfd of another real hugetlb store of the same size is
/// refused with a typed error naming what differs (the memfd's identity; where that matches,
/// the first chunk's offset and both frames), and so is a memfd of another length; neither
/// store changes (the sender's stays live and usable, no pool growth changes owner).
#[test]
fn the_memory_of_another_store_is_refused_by_name_and_changes_nothing() {
    let test = "the_memory_of_another_store_is_refused_by_name_and_changes_nothing";
    let _lock = pfnstore::hugetlb::testing::hugetlb_lock();
    if let Err(reason) = pfnstore::hugetlb::testing::can_reserve(HugePageSize::Huge2M) {
        return pfnstore::core::testing::skip(test, &reason);
    }
    let pool_before = two_mib_pool();
    {
        let (a, b, short) = match (
            two_mib_store(8 * MIB),
            two_mib_store(8 * MIB),
            two_mib_store(4 * MIB),
        ) {
            (Ok(a), Ok(b), Ok(short)) => (a, b, short),
            (Err(reason), ..) | (_, Err(reason), _) | (.., Err(reason)) => {
                return pfnstore::core::testing::skip(test, &reason);
            }
        };
        let file_a = a
            .create_file(FileOptions::new(8 * MIB).shared().populated())
            .unwrap();
        file_a.write(123, b"store a").unwrap();
        file_a
            .convert(
                2 * MIB + 5 * PAGE,
                PAGE,
                Shareability::Private,
                ConvertMode::Preserve,
            )
            .unwrap();
        let file_b = b
            .create_file(FileOptions::new(8 * MIB).shared().populated())
            .unwrap();
        file_b.write(123, b"store b").unwrap();
        let (files_a, files_b) = ([file_a.clone()], [file_b.clone()]);
        let (dump_a, dump_b) = (dump(&a, &files_a), dump(&b, &files_b));
        let (snapshot_a, snapshot_b) = (a.snapshot().unwrap(), b.snapshot().unwrap());
        let pool = two_mib_pool();
        let ledger = ledger_state();
        assert!(
            ledger.len() >= 3,
            "each store's growth has an entry: {ledger:?}"
        );
        let (id_a, id_b) = (memfd_identity(&a), memfd_identity(&b));
        let refused = |bytes: &[u8], memfd_of: &Store| {
            let memfd = OwnedFd::from(memfd_file(memfd_of));
            match Store::receive_snapshot(bytes, Some(memfd), StoreOptions::default()) {
                Ok(_) => panic!("a snapshot was rebuilt over the memory of another store"),
                Err(e) => e,
            }
        };

        // Another store's memfd: the identity check refuses it before anything is mapped...
        match refused(&snapshot_a, &b) {
            HandoverError::Memory(HugetlbError::WrongMemfd { recorded, found }) => {
                assert_eq!((recorded, found), (id_a, id_b));
            }
            other => panic!("another store's memfd: {other}"),
        }
        // ...and where the identity matches, the frames do not: the first chunk is named, with
        // the frame the snapshot recorded (A's) and the one the memfd has (B's).
        match refused(&with_memfd_identity(&snapshot_a, id_a, id_b), &b) {
            HandoverError::Memory(HugetlbError::PfnMoved {
                chunk,
                memfd_offset,
                recorded,
                now,
            }) => {
                assert_eq!((chunk, memfd_offset), (0, 0));
                assert_eq!(a.owner_of(recorded), Ok(Some(file_a.id())));
                assert_eq!(b.owner_of(now), Ok(Some(file_b.id())));
                assert!(a.owner_of(now).is_err(), "{now} is not A's");
            }
            other => panic!("another store's frames: {other}"),
        }
        // A memfd of another length.
        match refused(&snapshot_a, &short) {
            HandoverError::Memory(HugetlbError::MemfdLength { recorded, found }) => {
                assert_eq!((recorded, found), (8 * MIB, 4 * MIB));
            }
            other => panic!("a shorter memfd: {other}"),
        }

        // Nothing changed: no page taken from or given to the pool, no growth adopted (its
        // ledger entry would have been renamed), both stores as they were, records included.
        assert_eq!(two_mib_pool(), pool);
        assert_eq!(ledger_state(), ledger);
        assert_eq!(a.snapshot().unwrap(), snapshot_a);
        assert_eq!(b.snapshot().unwrap(), snapshot_b);
        assert_eq!(dump(&a, &files_a), dump_a);
        assert_eq!(dump(&b, &files_b), dump_b);
        // The sender's store is live and works.
        file_a.write(4 * MIB, b"still a").unwrap();
        let mut buf = [0u8; 7];
        file_a.read(4 * MIB, &mut buf).unwrap();
        assert_eq!(&buf, b"still a");
        file_a
            .convert(0, 2 * MIB, Shareability::Private, ConvertMode::Preserve)
            .unwrap();
        file_a
            .convert(0, 2 * MIB, Shareability::Shared, ConvertMode::Preserve)
            .unwrap();
        a.check_invariants().unwrap();
        b.check_invariants().unwrap();
    }
    assert_eq!(
        two_mib_pool(),
        pool_before,
        "each store gave its own growth back"
    );
}

// ---------------------------------------------------------------------------------------------
// Across processes, on real 1 GiB hugetlb pages: this binary re-executed as the other side.

const ROLE: &str = "PFNSTORE_HANDOVER_ROLE";
const SOCKET: &str = "PFNSTORE_HANDOVER_SOCKET";
const DUMP: &str = "PFNSTORE_HANDOVER_DUMP";

fn one_gib_pool() -> u64 {
    std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// A store of 2 GiB of real 1 GiB pages, growing the pool (given back when the store's owner
/// drops it); `None` with the reason where the machine cannot give them.
fn hugetlb_store() -> Result<Store, String> {
    pfnstore::hugetlb::testing::can_reserve(HugePageSize::Huge1G)?;
    let source = HugetlbSource::new(
        HugetlbConfig::new(2 * GIB)
            .with_strict(true)
            .with_grow_pool(true),
    )
    .map_err(|e| format!("2 GiB of 1 GiB pages: {e}"))?;
    Store::from_hugetlb(source, StoreOptions::default().with_shards(2)).map_err(|e| e.to_string())
}

fn spawn_child(
    role: &str,
    socket: &std::path::Path,
    dump: &std::path::Path,
) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "handover_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE, role)
        .env(SOCKET, socket)
        .env(DUMP, dump)
        .spawn()
        .unwrap()
}

/// Waits for `path` to exist (a child's listening socket), failing after a generous deadline.
fn wait_for(path: &std::path::Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !path.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("pfnstore-handover-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The other process: a receiver that checks the dump and keeps working, a receiver that dies
/// before answering, or a sender that waits to be killed.
#[test]
#[ignore = "run by the cross-process handover tests as their other process"]
fn handover_child() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let socket = std::path::PathBuf::from(std::env::var(SOCKET).unwrap());
    let dump_path = std::path::PathBuf::from(std::env::var(DUMP).unwrap());
    match role.as_str() {
        "receiver" | "crash" => {
            let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
            let (stream, _) = listener.accept().unwrap();
            if role == "crash" {
                // Dies with the snapshot half read, before it could answer.
                let mut header = [0u8; 8];
                let _ = recv_with_fd(&stream, &mut header);
                std::process::abort();
            }
            let received = Store::receive(&stream, StoreOptions::default()).unwrap();
            let want = std::fs::read_to_string(&dump_path).unwrap();
            let got = format!("{:?}", dump(&received.store, &received.files));
            assert_eq!(got, want, "the receiver sees another store");
            // It keeps converting, on the same memory.
            let a = &received.files[0];
            a.convert(0, 2 * MIB, Shareability::Private, ConvertMode::Preserve)
                .unwrap();
            a.convert(0, 2 * MIB, Shareability::Shared, ConvertMode::Preserve)
                .unwrap();
            received.store.check_invariants().unwrap();
            println!("receiver: ok");
        }
        "sender" => {
            let store = hugetlb_store().unwrap();
            let files = live_a_little(&store, 256 * MIB);
            std::fs::write(&dump_path, format!("{:?}", dump(&store, &files))).unwrap();
            wait_for(&socket);
            let stream = UnixStream::connect(&socket).unwrap();
            store.hand_over(&stream).unwrap();
            std::fs::write(dump_path.with_extension("sent"), "sent").unwrap();
            // Waits to be killed, holding its (sealed) store.
            loop {
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
        other => panic!("unknown role {other}"),
    }
}

#[test]
fn a_hugetlb_store_is_handed_to_another_process_which_gives_the_pool_back() {
    let test = "a_hugetlb_store_is_handed_to_another_process_which_gives_the_pool_back";
    let _lock = pfnstore::hugetlb::testing::hugetlb_lock();
    let pool_before = one_gib_pool();
    let store = match hugetlb_store() {
        Ok(store) => store,
        Err(reason) => return pfnstore::core::testing::skip(test, &reason),
    };
    let files = live_a_little(&store, 256 * MIB);
    let dir = temp_dir("a");
    let (socket, dump_path) = (dir.join("socket"), dir.join("dump"));
    std::fs::write(&dump_path, format!("{:?}", dump(&store, &files))).unwrap();
    let mut child = spawn_child("receiver", &socket, &dump_path);
    wait_for(&socket);
    let stream = UnixStream::connect(&socket).unwrap();
    let report = store.hand_over(&stream).unwrap();
    assert!(report.snapshot_bytes < 64 * 1024, "{report:?}");
    assert_eq!(files[0].pfn_at(0).unwrap_err(), StoreError::HandedOver);
    // The old process lets go: the pool stays grown while the new owner holds the memory...
    drop(files);
    drop(store);
    assert!(child.wait().unwrap().success(), "the receiver failed");
    // ...and the new owner gave it back when it dropped the store.
    assert_eq!(one_gib_pool(), pool_before, "the pool is not as it was");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_sender_killed_after_sending_leaves_the_receiver_going() {
    let test = "a_sender_killed_after_sending_leaves_the_receiver_going";
    let _lock = pfnstore::hugetlb::testing::hugetlb_lock();
    if let Err(reason) = pfnstore::hugetlb::testing::can_reserve(HugePageSize::Huge1G) {
        return pfnstore::core::testing::skip(test, &reason);
    }
    let pool_before = one_gib_pool();
    let dir = temp_dir("b");
    let (socket, dump_path) = (dir.join("socket"), dir.join("dump"));
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let mut sender = spawn_child("sender", &socket, &dump_path);
    let (stream, _) = listener.accept().unwrap();
    let received = Store::receive(&stream, StoreOptions::default());
    wait_for(&dump_path.with_extension("sent"));
    sender.kill().unwrap();
    let _ = sender.wait();
    let received = match received {
        Ok(r) => r,
        Err(e) => panic!("receive: {e}"),
    };
    let want = std::fs::read_to_string(&dump_path).unwrap();
    assert_eq!(
        format!("{:?}", dump(&received.store, &received.files)),
        want
    );
    let a = &received.files[0];
    a.write(0, b"after the sender died").unwrap();
    a.convert(0, 2 * MIB, Shareability::Private, ConvertMode::Zero)
        .unwrap();
    received.store.check_invariants().unwrap();
    drop(received);
    assert_eq!(one_gib_pool(), pool_before, "the pool is not as it was");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_receiver_killed_before_confirming_leaves_the_sender_as_it_was() {
    let test = "a_receiver_killed_before_confirming_leaves_the_sender_as_it_was";
    let _lock = pfnstore::hugetlb::testing::hugetlb_lock();
    let pool_before = one_gib_pool();
    let store = match hugetlb_store() {
        Ok(store) => store,
        Err(reason) => return pfnstore::core::testing::skip(test, &reason),
    };
    let files = live_a_little(&store, 256 * MIB);
    let before = dump(&store, &files);
    let dir = temp_dir("c");
    let (socket, dump_path) = (dir.join("socket"), dir.join("dump"));
    let mut child = spawn_child("crash", &socket, &dump_path);
    wait_for(&socket);
    let stream = UnixStream::connect(&socket).unwrap();
    let sent = store.hand_over(&stream);
    let _ = child.wait();
    assert!(matches!(sent, Err(HandoverError::ReceiverGone)), "{sent:?}");
    assert_eq!(dump(&store, &files), before, "nothing lost");
    files[0].write(0, b"still the owner").unwrap();
    store.check_invariants().unwrap();
    drop(files);
    drop(store);
    assert_eq!(one_gib_pool(), pool_before, "the pool is not as it was");
    let _ = std::fs::remove_dir_all(&dir);
}
