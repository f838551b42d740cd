//! Handing a source to another process: records, rebuilds, and the pool growth changing
//! owner. The cross-process tests re-execute this binary as the other process (the ignored
//! `handover_child` test) and pass the memfd over a Unix socket with `SCM_RIGHTS`. Tests on
//! real hugetlb pools hold the hugetlb lock, take at most 2 GiB and leave the pools as they
//! found them; without root or hugetlb they report themselves skipped.
#![cfg(not(pfnstore_loom))]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use pfnstore_core::{Geometry, PAGE_SIZE, PageSize, Pfn};
use pfnstore_hugetlb::pagemap::{Pagemap, Resolution};
use pfnstore_hugetlb::pool::{PoolCounts, PoolId, Sysfs, ledger_entries};
use pfnstore_hugetlb::testing::{
    HugetlbLock, ShuffledSource, can_reserve, hugetlb_lock, recv_with_fd, send_with_fd,
};
use pfnstore_hugetlb::{
    ChunkRecord, GrowthRecord, HostView, HugePageSize, HugetlbConfig, HugetlbError, HugetlbSource,
    MemorySource, PfnKind, Prefault, RecordProblem, RequestRecord, SYNTHETIC_PFN_BASE, SourceKind,
    SourceRecord, SyntheticReason, SyntheticSource, rebuild,
};

const GIB: u64 = 1 << 30;
const MIB2: u64 = 2 << 20;

// ---------------------------------------------------------------------------------------------
// A text form of a record, for the test's own socket messages (the facade has its own format).

fn size_name(size: HugePageSize) -> &'static str {
    match size {
        HugePageSize::Base4K => "4k",
        HugePageSize::Huge2M => "2m",
        HugePageSize::Huge1G => "1g",
    }
}

fn size_of_name(name: &str) -> HugePageSize {
    match name {
        "4k" => HugePageSize::Base4K,
        "2m" => HugePageSize::Huge2M,
        "1g" => HugePageSize::Huge1G,
        other => panic!("no page size {other}"),
    }
}

const REASONS: [(SyntheticReason, &str); 5] = [
    (SyntheticReason::NoMemory, "no-memory"),
    (SyntheticReason::OrdinaryPages, "ordinary"),
    (SyntheticReason::PagemapHidden, "hidden"),
    (SyntheticReason::NotPrefaulted, "not-prefaulted"),
    (SyntheticReason::Shuffled, "shuffled"),
];

fn kind_name(kind: PfnKind) -> String {
    match kind {
        PfnKind::Real => "real".into(),
        PfnKind::Synthetic { reason } => {
            let name = REASONS.iter().find(|(r, _)| *r == reason).unwrap().1;
            format!("synthetic:{name}")
        }
    }
}

fn kind_of_name(name: &str) -> PfnKind {
    match name.strip_prefix("synthetic:") {
        None => PfnKind::Real,
        Some(reason) => PfnKind::Synthetic {
            reason: REASONS.iter().find(|(_, n)| *n == reason).unwrap().0,
        },
    }
}

fn opt(value: Option<u64>) -> String {
    value.map_or("-".into(), |v| v.to_string())
}

fn encode(r: &SourceRecord) -> String {
    let mut out = String::new();
    let kind = match r.kind {
        SourceKind::Hugetlb => "hugetlb",
        SourceKind::Shuffled => "shuffled",
        SourceKind::Synthetic => "synthetic",
    };
    out += &format!("kind {kind}\npage_size {}\n", size_name(r.page_size));
    out += &format!(
        "geometry {} {}\nmemfd_len {}\n",
        r.geometry.order(PageSize::Size2M),
        r.geometry.order(PageSize::Size1G),
        r.memfd_len
    );
    match r.memfd_id {
        Some((dev, ino)) => out += &format!("memfd_id {dev} {ino}\n"),
        None => out += "memfd_id -\n",
    }
    let q = &r.request;
    let prefault = match q.prefault {
        Prefault::None => "none".to_string(),
        Prefault::MapPopulate => "populate".to_string(),
        Prefault::Threads(n) => format!("threads:{n}"),
    };
    out += &format!(
        "request {} {} {} {} {} {prefault} {}\n",
        q.requested_bytes,
        size_name(q.preferred),
        q.strict,
        opt(q.numa_node.map(u64::from)),
        q.grow_pool,
        q.mlock
    );
    for c in &r.chunks {
        out += &format!(
            "chunk {} {} {}\n",
            c.base.0,
            c.memfd_offset,
            kind_name(c.pfn_kind)
        );
    }
    for h in &r.holes {
        out += &format!("hole {} {}\n", h.start, h.end);
    }
    for g in &r.pool_growth {
        out += &format!(
            "growth {} {} {} {}\n",
            size_name(g.pool.page_size),
            opt(g.pool.node.map(u64::from)),
            g.pages,
            g.ledger_entry
        );
    }
    out
}

fn decode(text: &str) -> SourceRecord {
    let mut r = SourceRecord {
        kind: SourceKind::Synthetic,
        page_size: HugePageSize::Base4K,
        geometry: Geometry::X86_64,
        memfd_len: 0,
        memfd_id: None,
        chunks: Vec::new(),
        holes: Vec::new(),
        request: RequestRecord {
            requested_bytes: 0,
            preferred: HugePageSize::Base4K,
            strict: true,
            numa_node: None,
            grow_pool: false,
            prefault: Prefault::None,
            mlock: false,
        },
        pool_growth: Vec::new(),
    };
    let num = |s: &str| s.parse::<u64>().unwrap();
    let node = |s: &str| (s != "-").then(|| s.parse::<u32>().unwrap());
    for line in text.lines() {
        let w: Vec<&str> = line.split(' ').collect();
        match w[0] {
            "kind" => {
                r.kind = match w[1] {
                    "hugetlb" => SourceKind::Hugetlb,
                    "shuffled" => SourceKind::Shuffled,
                    _ => SourceKind::Synthetic,
                }
            }
            "page_size" => r.page_size = size_of_name(w[1]),
            "geometry" => {
                r.geometry = Geometry::new(w[1].parse().unwrap(), w[2].parse().unwrap()).unwrap()
            }
            "memfd_len" => r.memfd_len = num(w[1]),
            "memfd_id" => r.memfd_id = (w[1] != "-").then(|| (num(w[1]), num(w[2]))),
            "request" => {
                r.request = RequestRecord {
                    requested_bytes: num(w[1]),
                    preferred: size_of_name(w[2]),
                    strict: w[3] == "true",
                    numa_node: node(w[4]),
                    grow_pool: w[5] == "true",
                    prefault: match w[6] {
                        "none" => Prefault::None,
                        "populate" => Prefault::MapPopulate,
                        t => Prefault::Threads(t["threads:".len()..].parse().unwrap()),
                    },
                    mlock: w[7] == "true",
                }
            }
            "chunk" => r.chunks.push(ChunkRecord {
                base: Pfn(num(w[1])),
                memfd_offset: num(w[2]),
                pfn_kind: kind_of_name(w[3]),
            }),
            "hole" => r.holes.push(num(w[1])..num(w[2])),
            "growth" => r.pool_growth.push(GrowthRecord {
                pool: PoolId {
                    page_size: size_of_name(w[1]),
                    node: node(w[2]),
                },
                pages: num(w[3]),
                ledger_entry: w[4].to_string(),
            }),
            other => panic!("unknown record line {other:?}"),
        }
    }
    r
}

// ---------------------------------------------------------------------------------------------
// Helpers.

fn pool(page_size: HugePageSize) -> PoolId {
    PoolId {
        page_size,
        node: None,
    }
}

fn counts(page_size: HugePageSize) -> PoolCounts {
    Sysfs::system().read_pool(pool(page_size)).unwrap()
}

/// The lock, if this machine lets us resize the pool of `size`; otherwise the test is reported
/// skipped.
fn require(test: &str, size: HugePageSize) -> Option<HugetlbLock> {
    let lock = hugetlb_lock();
    if let Err(why) = can_reserve(size) {
        pfnstore_core::testing::skip(test, &why);
        return None;
    }
    Some(lock)
}

fn config(bytes: u64, page_size: HugePageSize) -> HugetlbConfig {
    HugetlbConfig::new(bytes)
        .with_page_size(page_size)
        .with_strict(true)
        .with_grow_pool(true)
        .with_prefault(Prefault::Threads(2))
}

/// The word the tests write into chunk `i` (at `marker_offset`).
fn marker(i: usize) -> u64 {
    0x5eed_0000_0000_0abc | ((i as u64) << 16)
}

/// Where in its chunk chunk `i`'s marker is.
fn marker_offset(chunk: &ChunkRecord, i: usize) -> u64 {
    chunk.memfd_offset + PAGE_SIZE * (i as u64 % 7) + 8
}

/// Writes every chunk's marker (skipping holes).
fn write_markers(source: &dyn MemorySource, record: &SourceRecord) {
    let view = HostView::from_memfd(source.memfd().unwrap()).unwrap();
    for (i, c) in record.chunks.iter().enumerate() {
        if !view.is_hole(marker_offset(c, i)) {
            view.write(marker_offset(c, i), &marker(i).to_le_bytes())
                .unwrap();
        }
    }
}

/// Checks every chunk's marker (holes read as zeros) through a view of `source`.
fn check_markers(source: &dyn MemorySource, record: &SourceRecord) {
    let view = HostView::from_memfd(source.memfd().unwrap()).unwrap();
    for (i, c) in record.chunks.iter().enumerate() {
        let mut word = [0u8; 8];
        view.read(marker_offset(c, i), &mut word).unwrap();
        let hole = record
            .holes
            .iter()
            .any(|h| h.contains(&marker_offset(c, i)));
        let expected = if hole { 0 } else { marker(i) };
        assert_eq!(u64::from_le_bytes(word), expected, "chunk {i}");
    }
}

/// Checks through pagemap, independently of the rebuild, that each backed chunk of
/// `source` with real PFNs is at its recorded frame.
fn check_pfns_through_a_view(source: &dyn MemorySource, record: &SourceRecord) {
    let view = HostView::from_memfd(source.memfd().unwrap()).unwrap();
    let page = record.page_size;
    let pagemap = Pagemap::open().unwrap();
    for (i, c) in record.chunks.iter().enumerate() {
        if c.pfn_kind != PfnKind::Real || view.is_hole(c.memfd_offset) {
            continue;
        }
        // One read maps the whole huge page into the view.
        view.read(c.memfd_offset, &mut [0u8; 8]).unwrap();
        let addr = view.as_ptr() as usize + c.memfd_offset as usize;
        let r = pagemap
            .resolve(addr, page.bytes() as usize, page, c.memfd_offset)
            .unwrap();
        assert_eq!(r, Resolution::Real(vec![c.base]), "chunk {i}");
    }
}

fn dup(fd: std::os::fd::BorrowedFd<'_>) -> OwnedFd {
    fd.try_clone_to_owned().unwrap()
}

/// Ledger entries of process `pid`.
fn entries_of(pid: u32) -> Vec<std::path::PathBuf> {
    ledger_entries(&Sysfs::system())
        .unwrap()
        .into_iter()
        .filter(|e| {
            e.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(&format!("{pid}."))
        })
        .collect()
}

fn ledger_has(name: &str) -> bool {
    ledger_entries(&Sysfs::system())
        .unwrap()
        .iter()
        .any(|e| e.file_name().unwrap().to_str() == Some(name))
}

fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------------
// The other process.

/// The environment variable that makes `handover_child` the other process of a test: its role,
/// `receive` or `send:<pages>`.
const CHILD: &str = "PFNSTORE_HANDOVER_CHILD";

/// The environment variable with the path of the socket the child connects to.
const SOCKET: &str = "PFNSTORE_HANDOVER_SOCKET";

/// How long either side waits for the other before the test fails (instead of hanging with
/// the hugetlb lock held).
const PATIENCE: Duration = Duration::from_secs(120);

/// A child process that is killed if the test fails before it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A listening socket at a fresh path, and the child started with `role` that connects to it.
fn spawn_child(role: &str) -> (UnixStream, KillOnDrop) {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let path = std::env::temp_dir().join(format!(
        "pfnstore-handover-{}-{}.sock",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    listener.set_nonblocking(true).unwrap();
    let mut child = KillOnDrop(
        std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "handover_child", "--ignored", "--nocapture"])
            .args(["--test-threads", "1"])
            .env(CHILD, role)
            .env(SOCKET, &path)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + PATIENCE;
    let socket = loop {
        match listener.accept() {
            Ok((socket, _)) => break socket,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if let Some(status) = child.0.try_wait().unwrap() {
                    panic!("the child ended before it connected: {status}");
                }
                assert!(Instant::now() < deadline, "the child never connected");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    let _ = std::fs::remove_file(&path);
    socket.set_nonblocking(false).unwrap();
    socket.set_read_timeout(Some(PATIENCE)).unwrap();
    (socket, child)
}

/// Sends a record and its memfd: an 8-byte length carrying the descriptor, then the text.
fn send_record(socket: &UnixStream, record: &SourceRecord, fd: std::os::fd::BorrowedFd<'_>) {
    let text = encode(record);
    send_with_fd(socket, &(text.len() as u64).to_le_bytes(), Some(fd)).unwrap();
    (&*socket).write_all(text.as_bytes()).unwrap();
}

fn recv_record(socket: &UnixStream) -> (SourceRecord, OwnedFd) {
    let mut len = [0u8; 8];
    let (n, fd) = recv_with_fd(socket, &mut len).unwrap();
    (&*socket).read_exact(&mut len[n..]).unwrap();
    let mut text = vec![0u8; u64::from_le_bytes(len) as usize];
    (&*socket).read_exact(&mut text).unwrap();
    (
        decode(std::str::from_utf8(&text).unwrap()),
        fd.expect("the memfd came with the record"),
    )
}

fn say(socket: &UnixStream, line: &str) {
    (&*socket)
        .write_all(format!("{line}\n").as_bytes())
        .unwrap();
}

fn hear(lines: &mut impl Iterator<Item = std::io::Result<String>>) -> String {
    lines
        .next()
        .expect("the other side said something")
        .unwrap()
}

/// The other process of the cross-process tests (run by them, never on its own). It does not
/// take the hugetlb lock: its parent holds it for it.
#[test]
#[ignore = "run in a child process by the handover tests"]
fn handover_child() {
    let role = std::env::var(CHILD).expect("run by a handover test");
    let path = std::env::var(SOCKET).expect("run by a handover test");
    let socket = UnixStream::connect(path).unwrap();
    socket.set_read_timeout(Some(PATIENCE)).unwrap();
    match role.split_once(':') {
        None => receive(&socket),
        Some(("send", pages)) => send(&socket, pages.parse().unwrap()),
        _ => panic!("unknown role {role}"),
    }
}

/// The receiving side: typed errors for records that do not fit the memfd (nothing taken over,
/// nothing allocated), then the rebuild; says `adopted <pages>`, waits for `go`, writes, drops
/// the source and says `dropped`.
fn receive(socket: &UnixStream) {
    let (record, fd) = recv_record(socket);
    let page = record.page_size;
    let free_before = page.is_hugetlb().then(|| counts(page).free);
    for (what, bad) in wrong_records(&record) {
        let err = match rebuild(&bad, Some(dup(fd.as_fd()))) {
            Err(e) => e,
            Ok(_) => panic!("{what}: rebuilt"),
        };
        check_typed(what, &err, &record);
    }
    for growth in &record.pool_growth {
        assert!(
            ledger_has(&growth.ledger_entry),
            "a failed rebuild takes nothing over"
        );
    }
    if let Some(free) = free_before {
        assert_eq!(
            counts(page).free,
            free,
            "a failed rebuild allocates nothing"
        );
    }
    let source = rebuild(&record, Some(fd)).unwrap();
    let mine = source.handover_record().unwrap();
    assert_eq!(
        mine.chunks, record.chunks,
        "the same chunks, PFNs and offsets"
    );
    assert_eq!(
        (mine.memfd_len, mine.memfd_id, &mine.holes),
        (record.memfd_len, record.memfd_id, &record.holes)
    );
    if let Some(free) = free_before {
        assert_eq!(counts(page).free, free, "the rebuild allocates nothing");
    }
    check_markers(source.as_ref(), &record);
    check_pfns_through_a_view(source.as_ref(), &record);
    let adopted: u64 = mine.pool_growth.iter().map(|g| g.pages).sum();
    assert_eq!(
        adopted,
        record.pool_growth.iter().map(|g| g.pages).sum::<u64>()
    );
    for growth in &record.pool_growth {
        assert!(!ledger_has(&growth.ledger_entry), "renamed to ours");
    }
    say(socket, &format!("adopted {adopted}"));
    let mut lines = BufReader::new(socket).lines();
    assert_eq!(hear(&mut lines), "go");
    // The memory is ours alone now: write it once more.
    let view = HostView::from_memfd(source.memfd().unwrap()).unwrap();
    view.write(record.chunks[0].memfd_offset, b"the receiver was here")
        .unwrap();
    drop(view);
    drop(source);
    say(socket, "dropped");
}

/// Records that must not rebuild, each consistent in itself but not with the memfd, and what
/// each is, for [`check_typed`].
fn wrong_records(record: &SourceRecord) -> Vec<(&'static str, SourceRecord)> {
    let mut out = Vec::new();
    let last = record.chunks.len() - 1;
    let chunk_pages = record.geometry.chunk_pages();
    let chunk_bytes = chunk_pages * PAGE_SIZE;
    if record.chunks[last].pfn_kind == PfnKind::Real {
        let mut r = record.clone();
        r.chunks[last].base = Pfn(r.chunks[last].base.0 ^ (chunk_pages << 3));
        out.push(("pfn", r));
    }
    out.push(("page size", wrong_page_size(record)));
    // One chunk more than the memfd holds.
    let mut r = record.clone();
    let n = r.chunks.len() as u64;
    r.chunks.push(ChunkRecord {
        base: match record.chunks[0].pfn_kind {
            PfnKind::Real => Pfn(record.chunks[0].base.0 + 1000 * chunk_pages),
            PfnKind::Synthetic { .. } => Pfn(SYNTHETIC_PFN_BASE.0 + n * chunk_pages),
        },
        memfd_offset: n * chunk_bytes,
        pfn_kind: record.chunks[0].pfn_kind,
    });
    r.memfd_len += chunk_bytes;
    out.push(("length", r));
    out
}

/// The record as if the memfd had pages of another size: 1G pages as 2M ones (each chunk
/// split in 512 with consecutive real PFNs), 2M pages as ordinary ones (synthetic PFNs),
/// ordinary pages as 2M ones.
fn wrong_page_size(record: &SourceRecord) -> SourceRecord {
    let mut r = record.clone();
    r.holes.clear();
    match record.page_size {
        HugePageSize::Huge1G => {
            r.page_size = HugePageSize::Huge2M;
            r.geometry = HugePageSize::Huge2M.geometry();
            r.chunks = record
                .chunks
                .iter()
                .flat_map(|c| {
                    (0..512).map(move |j| ChunkRecord {
                        base: Pfn(c.base.0 + j * 512),
                        memfd_offset: c.memfd_offset + j * MIB2,
                        pfn_kind: c.pfn_kind,
                    })
                })
                .collect();
        }
        HugePageSize::Huge2M => {
            r.page_size = HugePageSize::Base4K;
            for c in &mut r.chunks {
                c.pfn_kind = PfnKind::Synthetic {
                    reason: SyntheticReason::OrdinaryPages,
                };
                c.base = Pfn(SYNTHETIC_PFN_BASE.0 + c.memfd_offset / MIB2 * 512);
            }
        }
        HugePageSize::Base4K => r.page_size = HugePageSize::Huge2M,
    }
    r
}

fn check_typed(what: &str, err: &HugetlbError, record: &SourceRecord) {
    let last = record.chunks.len() - 1;
    let ok = match what {
        "pfn" => {
            matches!(err, HugetlbError::PfnMoved { chunk, recorded, now, .. }
                if *chunk == last && *now == record.chunks[last].base && recorded != now)
        }
        "page size" => matches!(err, HugetlbError::MemfdPageSize { found, .. }
            if *found == record.page_size),
        "length" => matches!(err, HugetlbError::MemfdLength { recorded, found }
            if *found == record.memfd_len && recorded > found),
        _ => false,
    };
    assert!(ok, "{what}: {err}");
}

/// The sending side of the test where the sender dies: grows the 2M pool by a source of
/// `pages` pages, writes the markers, sends the record and the memfd, says `sent` and waits to
/// be killed.
fn send(socket: &UnixStream, pages: u64) {
    let source = HugetlbSource::new(config(pages * MIB2, HugePageSize::Huge2M)).unwrap();
    let record = source.record();
    write_markers(&source, &record);
    send_record(socket, &record, source.memfd().unwrap().fd());
    say(socket, "sent");
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

// ---------------------------------------------------------------------------------------------
// Cross-process tests.

/// Hands `source` to a child and checks each step. `pool`: the pool the source grew and its
/// counts before; `grown`: the pages it added. The source is dropped once relinquished, as the
/// old process of a handover does; the pool must stay grown until the child drops its source.
fn hand_over_to_a_child(
    source: Box<dyn MemorySource>,
    pool: Option<(HugePageSize, PoolCounts)>,
    grown: u64,
) {
    let record = source.handover_record().unwrap();
    assert_eq!(
        record.pool_growth.iter().map(|g| g.pages).sum::<u64>(),
        grown
    );
    write_markers(source.as_ref(), &record);
    let (socket, mut child) = spawn_child("receive");
    let mut lines = BufReader::new(socket.try_clone().unwrap()).lines();
    send_record(&socket, &record, source.memfd().unwrap().fd());
    assert_eq!(hear(&mut lines), format!("adopted {grown}"));
    for growth in &record.pool_growth {
        assert!(!ledger_has(&growth.ledger_entry), "the child took it over");
    }
    assert_eq!(entries_of(child.0.id()).len(), record.pool_growth.len());
    source.relinquish().unwrap();
    assert!(
        source.handover_record().unwrap().pool_growth.is_empty(),
        "ours no more"
    );
    drop(source);
    if let Some((page, before)) = pool {
        assert_eq!(
            counts(page).total,
            before.total + grown,
            "dropping the old source gives nothing back"
        );
    }
    say(&socket, "go");
    assert_eq!(hear(&mut lines), "dropped");
    if let Some((page, before)) = pool {
        assert_eq!(counts(page), before, "the child gave the pool back");
    }
    let status = child.0.wait().unwrap();
    assert!(status.success(), "the child failed: {status}");
    assert!(entries_of(child.0.id()).is_empty(), "nothing left owed");
}

/// A hugetlb source that must grow the pool by at least one page and has `min_pages` pages or
/// more, handed to a child: the bytes, the PFNs, wrong records as typed errors; the pool is
/// given back when the child drops the source, not when this process does.
fn handover_of_real_hugetlb(test: &str, page: HugePageSize, min_pages: u64) {
    let Some(_lock) = require(test, page) else {
        return;
    };
    let before = counts(page);
    let pages = min_pages.max(before.available() + 1);
    if pages * page.bytes() > 2 * GIB {
        pfnstore_core::testing::skip(
            test,
            &format!(
                "{} {page} pages are free; would take more than 2 GiB",
                pages - 1
            ),
        );
        return;
    }
    let source = match HugetlbSource::new(config(pages * page.bytes(), page)) {
        Ok(s) => s,
        Err(HugetlbError::NoMemory { report }) => {
            pfnstore_core::testing::skip(test, &format!("no {page} pages here:\n{report}"));
            return;
        }
        Err(e) => panic!("{e}"),
    };
    if source.report().pfn_kind != Some(PfnKind::Real) {
        pfnstore_core::testing::skip(test, "pagemap hides PFNs here");
        return;
    }
    let grown = source.pool_pages_added();
    assert!(grown >= 1);
    hand_over_to_a_child(Box::new(source), Some((page, before)), grown);
}

#[test]
fn a_2m_hugetlb_source_is_handed_to_another_process() {
    handover_of_real_hugetlb(
        "a_2m_hugetlb_source_is_handed_to_another_process",
        HugePageSize::Huge2M,
        3,
    );
}

#[test]
fn a_1g_hugetlb_source_is_handed_to_another_process() {
    handover_of_real_hugetlb(
        "a_1g_hugetlb_source_is_handed_to_another_process",
        HugePageSize::Huge1G,
        1,
    );
}

/// Ordinary memory (synthetic PFNs, no pool) and the shuffled test source, across processes.
#[test]
fn ordinary_memory_and_shuffled_sources_are_handed_to_another_process() {
    let ordinary = HugetlbSource::new(
        config(2 * GIB, HugePageSize::Base4K)
            .with_grow_pool(false)
            .with_prefault(Prefault::None),
    )
    .unwrap();
    assert_eq!(
        ordinary.report().pfn_kind,
        Some(PfnKind::Synthetic {
            reason: SyntheticReason::OrdinaryPages
        })
    );
    hand_over_to_a_child(Box::new(ordinary), None, 0);
    let shuffled = ShuffledSource::new(HugePageSize::Base4K, 6, 9).unwrap();
    let view = HostView::from_memfd(shuffled.memfd().unwrap()).unwrap();
    // A punched page travels as a hole.
    view.punch_hole(shuffled.chunks()[2].memfd_offset, PAGE_SIZE)
        .unwrap();
    drop(view);
    assert_eq!(shuffled.record().holes.len(), 1);
    hand_over_to_a_child(Box::new(shuffled), None, 0);
}

/// The receiver dies after it adopted the growth and before it confirmed: its guardian hands
/// the growth back, the sender cannot relinquish it and gives it back itself.
#[test]
fn a_receiver_killed_before_confirming_hands_the_growth_back() {
    let test = "a_receiver_killed_before_confirming_hands_the_growth_back";
    let page = HugePageSize::Huge2M;
    let Some(_lock) = require(test, page) else {
        return;
    };
    let before = counts(page);
    let pages = 2u64.max(before.available() + 1);
    if pages * page.bytes() > 2 * GIB {
        pfnstore_core::testing::skip(test, "too many free 2M pages; would take over 2 GiB");
        return;
    }
    let source = HugetlbSource::new(config(pages * page.bytes(), page)).unwrap();
    let grown = source.pool_pages_added();
    let record = source.record();
    let [growth] = &record.pool_growth[..] else {
        panic!("one growth: {:?}", record.pool_growth);
    };
    write_markers(&source, &record);
    let (socket, mut child) = spawn_child("receive");
    let mut lines = BufReader::new(socket.try_clone().unwrap()).lines();
    send_record(&socket, &record, source.memfd().unwrap().fd());
    assert_eq!(hear(&mut lines), format!("adopted {grown}"));
    assert!(!ledger_has(&growth.ledger_entry));
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    eventually("the growth is ours again", || {
        ledger_has(&growth.ledger_entry) && entries_of(child.0.id()).is_empty()
    });
    assert_eq!(
        counts(page).total,
        before.total + grown,
        "nothing given back"
    );
    assert!(matches!(
        source.relinquish(),
        Err(HugetlbError::NotAdopted { .. })
    ));
    assert_eq!(source.pool_pages_added(), grown);
    check_markers(&source, &record);
    drop(source);
    assert_eq!(counts(page), before, "given back once, by the sender");
}

/// The sender dies after sending: the receiver rebuilds, takes the growth over from the dead
/// sender's entry, and gives it back when it drops the source.
#[test]
fn a_sender_killed_after_sending_leaves_the_growth_to_the_receiver() {
    let test = "a_sender_killed_after_sending_leaves_the_growth_to_the_receiver";
    let page = HugePageSize::Huge2M;
    let Some(_lock) = require(test, page) else {
        return;
    };
    let before = counts(page);
    // All free pages and one more: the dead sender's guardian finds nothing free to give back
    // while this process holds the memfd.
    let pages = 2u64.max(before.available() + 1);
    if pages * page.bytes() > 2 * GIB {
        pfnstore_core::testing::skip(test, "too many free 2M pages; would take over 2 GiB");
        return;
    }
    let (socket, mut child) = spawn_child(&format!("send:{pages}"));
    let (record, fd) = recv_record(&socket);
    let mut lines = BufReader::new(socket.try_clone().unwrap()).lines();
    assert_eq!(hear(&mut lines), "sent");
    let grown: u64 = record.pool_growth.iter().map(|g| g.pages).sum();
    assert!(grown >= 1);
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    assert_eq!(counts(page).total, before.total + grown);
    let source = rebuild(&record, Some(fd)).unwrap();
    check_markers(source.as_ref(), &record);
    check_pfns_through_a_view(source.as_ref(), &record);
    let adopted: u64 = source
        .handover_record()
        .unwrap()
        .pool_growth
        .iter()
        .map(|g| g.pages)
        .sum();
    assert_eq!(
        adopted, grown,
        "the dead sender's guardian gave nothing back"
    );
    assert!(entries_of(child.0.id()).is_empty());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(counts(page).total, before.total + grown, "still ours");
    drop(source);
    assert_eq!(counts(page), before);
    assert!(entries_of(std::process::id()).is_empty());
}

// ---------------------------------------------------------------------------------------------
// In-process tests of the rebuild's checks.

/// A hugetlb record rebuilt in this process: chunks with real PFNs are checked, holes are
/// skipped and never touched, and a record that says a page is backed where it is not (or the
/// reverse) is a typed error that allocates nothing.
#[test]
fn a_2m_rebuild_checks_pfns_skips_holes_and_allocates_nothing() {
    let test = "a_2m_rebuild_checks_pfns_skips_holes_and_allocates_nothing";
    let page = HugePageSize::Huge2M;
    let Some(_lock) = require(test, page) else {
        return;
    };
    let before = counts(page);
    {
        let source = HugetlbSource::new(config(4 * MIB2, page)).unwrap();
        if source.report().pfn_kind != Some(PfnKind::Real) {
            pfnstore_core::testing::skip(test, "pagemap hides PFNs here");
            return;
        }
        let view = source.map_view().unwrap();
        let record = source.record();
        write_markers(&source, &record);
        view.punch_hole(MIB2, MIB2).unwrap();
        let record = source.record();
        assert_eq!(record.holes.len(), 1);
        assert_eq!(record.holes[0], MIB2..2 * MIB2);
        let fd = || dup(source.memfd().unwrap().fd());
        let free = counts(page).free;

        let mut wrong = record.clone();
        wrong.chunks[2].base = Pfn(wrong.chunks[2].base.0 + 512 * 1024);
        assert!(matches!(
            HugetlbSource::rebuild(&wrong, fd()),
            Err(HugetlbError::PfnMoved { chunk: 2, memfd_offset, .. }) if memfd_offset == 2 * MIB2
        ));
        let mut no_hole = record.clone();
        no_hole.holes.clear();
        assert!(matches!(
            HugetlbSource::rebuild(&no_hole, fd()),
            Err(HugetlbError::BackedPages {
                expected: 4,
                found: 3
            })
        ));
        // As many holes as there are, but the wrong one: the missing page is found when it is
        // touched, and the page that took from the pool is given back.
        let mut moved = record.clone();
        moved.holes[0] = 3 * MIB2..4 * MIB2;
        assert!(matches!(
            HugetlbSource::rebuild(&moved, fd()),
            Err(HugetlbError::PageMissing {
                chunk: 1,
                memfd_offset
            }) if memfd_offset == MIB2
        ));
        assert!(view.is_hole(MIB2));
        assert_eq!(counts(page).free, free, "nothing allocated by any of them");

        let rebuilt = HugetlbSource::rebuild(&record, fd()).unwrap();
        assert_eq!(counts(page).free, free, "nor by the rebuild");
        assert_eq!(rebuilt.chunks().len(), 4);
        rebuilt.verify_pfns().unwrap();
        check_markers(&rebuilt, &record);
        assert!(
            rebuilt.map_view().unwrap().is_hole(MIB2),
            "the hole is known"
        );
        // In one process the "new owner" adopted our own growth; dropping it before the
        // handover is confirmed hands it back to us, the old owner, who is alive.
        assert_eq!(rebuilt.pool_pages_added(), source.pool_pages_added());
        drop(rebuilt);
        assert_eq!(
            source.record().pool_growth,
            record.pool_growth,
            "handed back"
        );
    }
    assert_eq!(counts(page), before);
}

/// Ordinary memory: the record of a rebuilt source is the record it was rebuilt from, and a
/// memfd of another size, length or file is a typed error.
#[test]
fn an_ordinary_memory_source_rebuilds_and_refuses_a_wrong_memfd() {
    let no_prefault = |bytes| {
        config(bytes, HugePageSize::Base4K)
            .with_grow_pool(false)
            .with_prefault(Prefault::None)
    };
    let source = HugetlbSource::new(no_prefault(2 * GIB)).unwrap();
    let record = source.record();
    write_markers(&source, &record);
    let fd = || dup(source.memfd().unwrap().fd());
    let rebuilt = rebuild(&record, Some(fd())).unwrap();
    assert_eq!(rebuilt.handover_record().unwrap(), record);
    check_markers(rebuilt.as_ref(), &record);
    assert_eq!(rebuilt.report().pfn_kind, source.report().pfn_kind);
    assert_eq!(rebuilt.report().bytes, 2 * GIB);

    let mut two_m = record.clone();
    two_m.page_size = HugePageSize::Huge2M;
    assert!(matches!(
        rebuild(&two_m, Some(fd())),
        Err(HugetlbError::MemfdPageSize {
            recorded: HugePageSize::Huge2M,
            found: HugePageSize::Base4K
        })
    ));
    let mut shorter = record.clone();
    shorter.chunks.pop();
    shorter.memfd_len = GIB;
    assert!(matches!(
        rebuild(&shorter, Some(fd())),
        Err(HugetlbError::MemfdLength { recorded: GIB, found }) if found == 2 * GIB
    ));
    let other = HugetlbSource::new(no_prefault(2 * GIB)).unwrap();
    assert!(matches!(
        rebuild(&record, Some(dup(other.memfd().unwrap().fd()))),
        Err(HugetlbError::WrongMemfd { .. })
    ));
    let mut misplaced = record.clone();
    misplaced.chunks[1].base = Pfn(misplaced.chunks[1].base.0 + (1 << 18));
    assert!(matches!(
        rebuild(&misplaced, Some(fd())),
        Err(HugetlbError::InvalidRecord {
            chunk: Some(1),
            problem: RecordProblem::Base { .. }
        })
    ));
    let mut swapped = record.clone();
    swapped.chunks.swap(0, 1);
    assert!(matches!(
        rebuild(&swapped, Some(fd())),
        Err(HugetlbError::InvalidRecord {
            chunk: Some(0),
            problem: RecordProblem::MemfdOffset { memfd_offset: GIB }
        })
    ));
    let mut real = record.clone();
    real.chunks[0].pfn_kind = PfnKind::Real;
    assert!(matches!(
        rebuild(&real, Some(fd())),
        Err(HugetlbError::InvalidRecord { chunk: Some(0), .. })
    ));
    assert!(matches!(
        SyntheticSource::rebuild(&record),
        Err(HugetlbError::InvalidRecord {
            problem: RecordProblem::Kind { .. },
            ..
        })
    ));
}

/// A source that was mlocked is rebuilt locked on fault: nothing is faulted in (locking
/// ordinary pages outright would allocate every page of the memfd).
#[test]
fn an_mlocked_source_is_rebuilt_locked_on_fault_without_faulting() {
    let test = "an_mlocked_source_is_rebuilt_locked_on_fault_without_faulting";
    let source = HugetlbSource::new(
        config(GIB, HugePageSize::Base4K)
            .with_grow_pool(false)
            .with_prefault(Prefault::None),
    )
    .unwrap();
    let mut record = source.record();
    record.request.mlock = true;
    let rebuilt = match HugetlbSource::rebuild(&record, dup(source.memfd().unwrap().fd())) {
        Ok(r) => r,
        Err(e @ HugetlbError::Os { op: "mlock", .. }) => {
            pfnstore_core::testing::skip(test, &format!("cannot mlock 1 GiB here: {e}"));
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let addr = rebuilt.chunks()[0].host.unwrap().as_ptr() as usize;
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    // The mapping's block of smaps: its header line to its VmFlags line.
    let mut block = smaps
        .lines()
        .skip_while(|l| !l.starts_with(&format!("{addr:x}-")));
    assert!(
        block.next().is_some(),
        "the mapping at {addr:#x} is in smaps"
    );
    let block: Vec<&str> = block.take_while(|l| !l.starts_with("VmFlags:")).collect();
    let rss = block
        .iter()
        .find_map(|l| l.strip_prefix("Rss:"))
        .map(|v| v.trim().trim_end_matches(" kB").parse::<u64>().unwrap())
        .unwrap();
    assert_eq!(rss, 0, "nothing faulted in");
    let flags = smaps
        .lines()
        .skip_while(|l| !l.starts_with(&format!("{addr:x}-")))
        .find(|l| l.starts_with("VmFlags:"))
        .unwrap();
    assert!(
        flags.split_whitespace().any(|f| f == "lf"),
        "locked on fault: {flags}"
    );
}

/// The shuffled source keeps its chunk order and holes.
#[test]
fn a_shuffled_source_rebuilds_with_its_order_and_holes() {
    let source = ShuffledSource::new(HugePageSize::Base4K, 5, 3).unwrap();
    let view = HostView::from_memfd(source.memfd().unwrap()).unwrap();
    view.punch_hole(source.chunks()[4].memfd_offset, 2 * PAGE_SIZE)
        .unwrap();
    let record = source.record();
    write_markers(&source, &record);
    let rebuilt = ShuffledSource::rebuild(&record, dup(source.memfd().unwrap().fd())).unwrap();
    assert_eq!(rebuilt.order(), source.order());
    assert_eq!(rebuilt.record(), record);
    check_markers(&rebuilt, &record);
    let rebuilt_view = HostView::from_memfd(rebuilt.memfd().unwrap()).unwrap();
    assert!(rebuilt_view.is_hole(source.chunks()[4].memfd_offset + PAGE_SIZE));
    let mut swapped = record.clone();
    swapped.chunks[0].memfd_offset = swapped.chunks[1].memfd_offset;
    assert!(matches!(
        rebuild(&swapped, Some(dup(source.memfd().unwrap().fd()))),
        Err(HugetlbError::InvalidRecord {
            chunk: Some(1),
            problem: RecordProblem::MemfdOffset { .. }
        })
    ));
}

/// A synthetic source is rebuilt from its chunk bases alone: 16 TiB of 1 GiB chunks.
#[test]
fn a_synthetic_source_rebuilds_from_its_chunk_bases() {
    let source = SyntheticSource::new(Geometry::X86_64, Pfn(1 << 18), 16 << 10).unwrap();
    let record = source.record();
    assert_eq!(record.chunks.len(), 16 << 10);
    let rebuilt = rebuild(&record, None).unwrap();
    assert_eq!(rebuilt.chunks(), source.chunks());
    assert_eq!(rebuilt.handover_record().unwrap(), record);
    assert_eq!(rebuilt.report().bytes, 16 << 40);
    let last = Pfn((1 << 18) + (16 << 28) - 1);
    assert_eq!(rebuilt.locate(last), source.locate(last));
    let mut gap = record.clone();
    gap.chunks[7].base = Pfn(gap.chunks[7].base.0 + (1 << 18));
    assert!(matches!(
        rebuild(&gap, None),
        Err(HugetlbError::InvalidRecord {
            chunk: Some(7),
            problem: RecordProblem::Base { .. }
        })
    ));
    let mut round_trip = decode(&encode(&record));
    assert_eq!(round_trip, record);
    round_trip.memfd_len = 4096;
    assert!(rebuild(&round_trip, None).is_err());
}
