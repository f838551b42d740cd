//! The scenario runner: files, subscribers, worker threads in rounds, a check of everything
//! between rounds, and the end.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use pfnstore::core::testing::XorShift;
use pfnstore::subscribers::{IommuMapper, KvmMmu};
use pfnstore::{
    ConvertMode, FileOptions, GuestFile, Interest, PinOwner, Registration, Shareability, Store,
};

use crate::common::{PAGE, dyn_sub};
use crate::model::{FileSpec, PageModel, Plan, ThreadModel};
use crate::ops::Ctx;
use crate::stamps::{Content, splitmix};

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Counts of outcomes, printed at the end of a scenario.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    pub(crate) ops: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) out_of_memory: AtomicU64,
    pub(crate) mapping_limit: AtomicU64,
    pub(crate) probes: AtomicU64,
}

pub(crate) struct Harness {
    pub(crate) name: String,
    pub(crate) store: Store,
    pub(crate) specs: Vec<FileSpec>,
    pub(crate) files: Vec<GuestFile>,
    /// Pages per protection unit of each file's mapping.
    pub(crate) units: Vec<u64>,
    /// The memfd's page, in 4 KiB pages: what a file holds at least.
    pub(crate) granule: u64,
    pub(crate) plan: Plan,
    pub(crate) models: Vec<Mutex<ThreadModel>>,
    pub(crate) generation: AtomicU64,
    pub(crate) mmu: Arc<KvmMmu>,
    pub(crate) iommu: Arc<IommuMapper>,
    pub(crate) registrations: Mutex<Vec<Registration>>,
    pub(crate) failures: Mutex<Vec<String>>,
    pub(crate) failed: AtomicBool,
    pub(crate) progress: AtomicU64,
    pub(crate) tally: Tally,
}

impl Harness {
    pub(crate) fn new(name: &str, store: Store, specs: Vec<FileSpec>, plan: Plan) -> Harness {
        assert!(
            store.has_host_memory(),
            "{name}: the store has no host memory"
        );
        // Subscribed before the files exist, as a VMM does at start: they must hear of files
        // created later (tests/stress.rs has the minimal reproduction of the bug that was).
        let iommu = Arc::new(IommuMapper::new("iommu", store.geometry()));
        let mmu = Arc::new(KvmMmu::new("kvm", &store));
        let registrations = vec![
            store.subscribe(&dyn_sub(&iommu), Interest::All).unwrap(),
            store.subscribe(&dyn_sub(&mmu), Interest::All).unwrap(),
        ];
        let files: Vec<GuestFile> = specs
            .iter()
            .map(|spec| {
                let options = FileOptions::new(spec.pages * PAGE);
                let options = if spec.shared {
                    options.shared()
                } else {
                    options
                };
                store.create_file(options).unwrap()
            })
            .collect();
        let granule = store.memfd().map_or(1, |m| m.page_size().base_pages());
        let units = files
            .iter()
            .map(|f| f.stats().protection_unit / PAGE)
            .collect();
        let models = (0..plan.threads)
            .map(|_| {
                Mutex::new(ThreadModel {
                    files: specs
                        .iter()
                        .map(|spec| {
                            vec![
                                PageModel {
                                    shared: spec.shared,
                                    content: Content::ZERO,
                                    backed: false,
                                    pins: 0,
                                };
                                spec.slots()
                            ]
                        })
                        .collect(),
                    pins: Vec::new(),
                })
            })
            .collect();
        Harness {
            name: name.to_string(),
            store,
            specs,
            files,
            units,
            granule,
            plan,
            models,
            generation: AtomicU64::new(0),
            mmu,
            iommu,
            registrations: Mutex::new(registrations),
            failures: Mutex::new(Vec::new()),
            failed: AtomicBool::new(false),
            progress: AtomicU64::new(0),
            tally: Tally::default(),
        }
    }

    pub(crate) fn fail(&self, who: &str, message: String) {
        self.failed.store(true, Ordering::SeqCst);
        lock(&self.failures).push(format!(
            "{} (seed {:#x}): {who}: {message}",
            self.name, self.plan.seed
        ));
    }

    pub(crate) fn tick(&self) {
        self.progress.fetch_add(1, Ordering::Relaxed);
    }

    /// Runs the rounds, checking everything between them, then the end checks.
    pub(crate) fn run(self) {
        let threads = self.plan.threads;
        let barrier = Barrier::new(threads + 1);
        let done = AtomicBool::new(false);
        let started = Instant::now();
        std::thread::scope(|s| {
            for t in 0..threads {
                let (h, barrier) = (&self, &barrier);
                s.spawn(move || h.worker(t, barrier));
            }
            let (h, done_ref) = (&self, &done);
            s.spawn(move || h.watchdog(done_ref));
            for round in 0..self.plan.rounds {
                barrier.wait();
                if !self.failed.load(Ordering::SeqCst) {
                    let mut models: Vec<_> = self.models.iter().map(lock).collect();
                    let checked = catch_unwind(AssertUnwindSafe(|| {
                        self.check_all(&models)?;
                        self.exercise(&mut models, round)
                    }));
                    match checked {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => self.fail(&format!("check after round {round}"), e),
                        Err(panic) => {
                            self.fail(&format!("check after round {round}"), panic_text(&panic))
                        }
                    }
                }
                barrier.wait();
            }
            // The workers drop their pins after the last round.
            done.store(true, Ordering::SeqCst);
        });
        self.assert_ok();
        let report = format!(
            "{} (seed {:#x}): {} ops ({} refused as the model predicted, {} out of memory, {} at the mapping limit), {} protection probes",
            self.name,
            self.plan.seed,
            self.tally.ops.load(Ordering::Relaxed),
            self.tally.refused.load(Ordering::Relaxed),
            self.tally.out_of_memory.load(Ordering::Relaxed),
            self.tally.mapping_limit.load(Ordering::Relaxed),
            self.tally.probes.load(Ordering::Relaxed),
        );
        self.finish();
        eprintln!("{report}, {:.1} s", started.elapsed().as_secs_f64());
    }

    pub(crate) fn assert_ok(&self) {
        let failures = lock(&self.failures);
        assert!(
            failures.is_empty(),
            "{} failure(s):\n{}",
            failures.len(),
            failures.join("\n")
        );
    }

    /// Aborts the process when nothing completes for five minutes: a deadlock. (Not a speed
    /// check: a sanitizer run is slow, but it completes operations.)
    pub(crate) fn watchdog(&self, done: &AtomicBool) {
        let mut last = (self.progress.load(Ordering::Relaxed), Instant::now());
        while !done.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(200));
            let now = self.progress.load(Ordering::Relaxed);
            if now != last.0 {
                last = (now, Instant::now());
            } else if last.1.elapsed() > Duration::from_secs(300) {
                eprintln!(
                    "{}: no operation completed for 300 s: deadlock; aborting",
                    self.name
                );
                std::process::abort();
            }
        }
    }

    pub(crate) fn worker(&self, t: usize, barrier: &Barrier) {
        let mut rng = XorShift::new(splitmix(self.plan.seed ^ (t as u64 + 1)) | 1);
        for round in 0..self.plan.rounds {
            if !self.failed.load(Ordering::SeqCst) {
                let mut model = lock(&self.models[t]);
                let result = catch_unwind(AssertUnwindSafe(|| {
                    let mut ctx = Ctx {
                        h: self,
                        t,
                        model: &mut model,
                        rng: &mut rng,
                    };
                    for i in 0..self.plan.ops {
                        if self.failed.load(Ordering::Relaxed) {
                            break;
                        }
                        ctx.step()
                            .map_err(|e| format!("round {round} op {i}: {e}"))?;
                        self.tick();
                    }
                    Ok::<(), String>(())
                }));
                match result {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => self.fail(&format!("thread {t}"), e),
                    Err(panic) => self.fail(&format!("thread {t}"), panic_text(&panic)),
                }
            }
            barrier.wait();
            barrier.wait();
        }
        let mut model = lock(&self.models[t]);
        let owner = PinOwner(t as u32);
        for (f, first, pages) in std::mem::take(&mut model.pins) {
            if let Err(e) = self.files[f].unpin(first * PAGE, pages * PAGE, owner) {
                self.fail(&format!("thread {t}"), format!("final unpin: {e}"));
            }
            for p in first..first + pages {
                if let Some(slot) = self.specs[f].slot(p) {
                    model.files[f][slot].pins -= 1;
                }
            }
        }
    }

    /// After the rounds: everything shared (PRESERVE keeps private bytes) and checked once
    /// more; the files go (half destroyed, half dropped) and nothing is left allocated.
    pub(crate) fn finish(self) {
        let mut models: Vec<_> = self.models.iter().map(lock).collect();
        for (f, file) in self.files.iter().enumerate() {
            file.convert(0, file.size(), Shareability::Shared, ConvertMode::Preserve)
                .unwrap_or_else(|e| panic!("{}: converting file {f} to shared: {e}", self.name));
            for (t, model) in models.iter_mut().enumerate() {
                for w in &self.specs[f].windows {
                    for p in w.clone() {
                        if self.specs[f].owner_of(p, self.plan.threads) == t
                            && let Some(slot) = self.specs[f].slot(p)
                        {
                            model.files[f][slot].shared = true;
                        }
                    }
                }
            }
        }
        if let Err(e) = self.check_all(&models) {
            panic!("{}: after converting everything to shared: {e}", self.name);
        }
        drop(models);
        let Harness {
            name,
            store,
            files,
            mmu,
            iommu,
            registrations,
            ..
        } = self;
        for (f, file) in files.into_iter().enumerate() {
            if f % 2 == 0 {
                file.destroy()
                    .unwrap_or_else(|e| panic!("{name}: destroying file {f}: {e}"));
            } else {
                drop(file);
            }
        }
        let stats = store.stats();
        assert_eq!(
            (
                stats.files,
                stats.allocator.total.allocated_pages,
                stats.allocator.total.quarantined_pages
            ),
            (0, 0, 0),
            "{name}: with every file gone, nothing is allocated or quarantined"
        );
        store
            .check_invariants()
            .unwrap_or_else(|e| panic!("{name}: at the end: {e}"));
        assert!(
            iommu.violations().is_empty(),
            "{name}: {:?}",
            iommu.violations()
        );
        assert!(
            mmu.violations().is_empty(),
            "{name}: {:?}",
            mmu.violations()
        );
        drop(registrations);
    }
}

pub(crate) fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}
