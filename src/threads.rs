//! Work split over the compute threads of the project's own CPU kernels.

/// A run of [`split_units`] and its first unit, until a thread takes it.
type Slot<'a, T> = std::sync::Mutex<Option<(usize, &'a mut [T])>>;

/// Splits `out` into runs of whole units of `unit` values, at most `threads` of them, and runs
/// `work(first_unit, run)` on each, on libtorch's OpenMP threads where its runtime is found (see
/// [`openmp`]), else the first run on the calling thread and each other on a scoped thread. Each run is
/// computed the same way whatever the split and the threads, so results do not depend on them.
pub(crate) fn split_units<T: Send>(out: &mut [T], unit: usize, threads: usize, work: impl Fn(usize, &mut [T]) + Sync) {
    let unit = unit.max(1);
    let units = out.len() / unit;
    let per_run = units.div_ceil(threads.max(1)).max(1);
    let mut runs: Vec<(usize, &mut [T])> =
        out.chunks_mut(per_run * unit).enumerate().map(|(i, run)| (i * per_run, run)).collect();
    match runs.len() {
        0 => {}
        1 => runs.drain(..).for_each(|(first, run)| work(first, run)),
        count => {
            // Each run taken once, by whichever thread the team gives its index.
            let slots: Vec<Slot<'_, T>> = runs.drain(..).map(|run| std::sync::Mutex::new(Some(run))).collect();
            let run_slot = |i: usize| {
                let taken = slots[i].lock().map(|mut slot| slot.take()).unwrap_or(None);
                if let Some((first, run)) = taken {
                    work(first, run);
                }
            };
            if !openmp::run_team(count, &run_slot) {
                run_scoped(count, &run_slot);
            }
        }
    }
}

/// `run(0..runs)`: the first on the calling thread, each other on a scoped thread.
fn run_scoped(runs: usize, run: &(dyn Fn(usize) + Sync)) {
    std::thread::scope(|scope| {
        for i in 1..runs {
            scope.spawn(move || run(i));
        }
        run(0);
    });
}

/// libtorch's own OpenMP runtime, found at run time (`GOMP_parallel`, the entry compilers emit for
/// `#pragma omp parallel`; libgomp and Intel's runtime both export it). Between libtorch's parallel
/// operators its worker threads spin for a while before they sleep; threads of our own started beside
/// them compete with the spinning ones for the same cores (on 2 cores a few-row projection took 1.6x as
/// long). Running our work as an OpenMP team uses those threads instead, and saves a thread start.
mod openmp {
    use std::ffi::{c_int, c_uint, c_void, CStr};
    use std::panic::{catch_unwind, AssertUnwindSafe};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::OnceLock;

    type Body = unsafe extern "C" fn(*mut c_void);
    type Parallel = unsafe extern "C" fn(Body, *mut c_void, c_uint, c_uint);
    type Query = unsafe extern "C" fn() -> c_int;

    struct Runtime {
        parallel: Parallel,
        thread_num: Query,
        team_size: Query,
        in_parallel: Query,
    }

    fn runtime() -> Option<&'static Runtime> {
        static RUNTIME: OnceLock<Option<Runtime>> = OnceLock::new();
        RUNTIME
            .get_or_init(|| {
                if std::env::var_os("ARCANA_NO_OPENMP_TEAM").is_some() {
                    return None;
                }
                let find = |name: &CStr| {
                    // SAFETY: looks a symbol up among the libraries already loaded (libtorch's).
                    let found = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
                    (!found.is_null()).then_some(found)
                };
                let (parallel, thread_num) = (find(c"GOMP_parallel")?, find(c"omp_get_thread_num")?);
                let (team_size, in_parallel) = (find(c"omp_get_num_threads")?, find(c"omp_in_parallel")?);
                // SAFETY: these are the OpenMP runtime's entries, with these C signatures.
                unsafe {
                    Some(Runtime {
                        parallel: std::mem::transmute::<*mut c_void, Parallel>(parallel),
                        thread_num: std::mem::transmute::<*mut c_void, Query>(thread_num),
                        team_size: std::mem::transmute::<*mut c_void, Query>(team_size),
                        in_parallel: std::mem::transmute::<*mut c_void, Query>(in_parallel),
                    })
                }
            })
            .as_ref()
    }

    struct Team<'a> {
        runtime: &'static Runtime,
        runs: usize,
        run: &'a (dyn Fn(usize) + Sync),
        panicked: AtomicBool,
    }

    unsafe extern "C" fn body(data: *mut c_void) {
        // SAFETY: `data` is the `Team` that `run_team` keeps alive until the team has finished.
        let team = unsafe { &*(data as *const Team) };
        // SAFETY: called inside the parallel region, as the runtime's queries expect.
        let (me, size) = unsafe { ((team.runtime.thread_num)(), (team.runtime.team_size)()) };
        let (me, size) = (me.max(0) as usize, size.max(1) as usize);
        // A team smaller than asked (OMP_THREAD_LIMIT, say) still runs every run.
        for i in (me..team.runs).step_by(size) {
            if catch_unwind(AssertUnwindSafe(|| (team.run)(i))).is_err() {
                team.panicked.store(true, Ordering::Relaxed);
            }
        }
    }

    /// Runs `run(0..runs)` on an OpenMP team of `runs` threads; false where no runtime was found or we
    /// are inside a parallel region already (the caller then runs them itself).
    pub fn run_team(runs: usize, run: &(dyn Fn(usize) + Sync)) -> bool {
        let Some(runtime) = runtime() else { return false };
        // SAFETY: a plain query of the calling thread's state.
        if unsafe { (runtime.in_parallel)() } != 0 {
            return false;
        }
        let team = Team { runtime, runs, run, panicked: AtomicBool::new(false) };
        let threads = c_uint::try_from(runs).unwrap_or(c_uint::MAX);
        // SAFETY: `body` reads `team` only while `GOMP_parallel` runs, which returns once every thread
        // of the team has finished.
        unsafe { (runtime.parallel)(body, &team as *const Team as *mut c_void, threads, 0) };
        if team.panicked.load(Ordering::Relaxed) {
            panic!("a compute thread panicked");
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::{openmp, run_scoped, split_units};
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn every_unit_is_written_once_with_its_own_index_for_any_thread_count() {
        for threads in [0, 1, 2, 3, 7, 64] {
            for units in [0usize, 1, 5, 16] {
                let mut out = vec![usize::MAX; units * 3];
                split_units(&mut out, 3, threads, |first, run| {
                    for (j, values) in run.chunks_mut(3).enumerate() {
                        values.iter_mut().for_each(|v| *v = first + j);
                    }
                });
                let expected: Vec<usize> = (0..units).flat_map(|u| [u, u, u]).collect();
                assert_eq!(out, expected, "threads {threads}, units {units}");
            }
        }
    }

    #[test]
    fn libtorchs_openmp_team_and_scoped_threads_run_every_index_once() {
        let _libtorch = tch::get_num_threads();
        for runs in [2usize, 3, 9] {
            let counts: Vec<AtomicUsize> = (0..runs).map(|_| AtomicUsize::new(0)).collect();
            let run = |i: usize| {
                counts[i].fetch_add(1, Ordering::Relaxed);
            };
            assert!(openmp::run_team(runs, &run), "libtorch's OpenMP runtime was not found");
            run_scoped(runs, &run);
            assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 2), "runs {runs}");
        }
    }
}
