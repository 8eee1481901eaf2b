//! A model's queue: the requests of every session waiting for it, and how a batch is formed.
//!
//! One FIFO per session and priority; a batch takes high priority first and, within a
//! priority, one request per session in turn (round robin), so a session that floods a model
//! cannot starve another. High priority cannot starve normal either: while both wait, at most
//! HIGH_RUN high-priority requests are taken in a row. Only requests with the same dtypes and
//! dimensions after the first (the `key`) share a batch; a batch is formed around the oldest
//! request it can take. A full queue answers OVERLOADED at once (the dispatcher does).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::events::Events;
use super::meter::Meters;
use super::session::Session;
use crate::dtype::DType;
use crate::signature::Signature;

/// While requests of both priorities wait, at most this many high-priority ones are taken in
/// a row before a normal one: normal priority keeps at least a quarter of the service.
pub const HIGH_RUN: u32 = 3;

/// A model's scheduling settings (its TOML keys).
#[derive(Clone, Debug, Default)]
pub struct Policy {
    pub max_batch_size: u64,
    pub max_queue_delay_us: u64,
    pub preferred_batch_sizes: Vec<u64>,
    pub max_queue: u64,
    pub max_batch_bytes: u64,
}

/// One input of a queued request: where its bytes are in the session's mapping.
#[derive(Clone, Debug)]
pub struct Input {
    pub offset: u64,
    pub nbytes: u64,
    pub dtype: DType,
    pub dims: Vec<u64>,
    /// Its name, when its values still need SPEC §5's checks (a large bytes or bool tensor:
    /// the worker that gathers it checks them, not the dispatcher).
    pub unchecked: Option<String>,
}

/// A request taken from a ring, checked, waiting for its model.
pub struct Job {
    pub session: Arc<Session>,
    pub position: u64,
    pub request_id: u64,
    pub read_at: Instant,
    pub queued_at: Instant,
    pub deadline: Option<Instant>,
    pub priority: u8,
    pub inputs: Vec<Input>,
    /// Rows: dimension 0 of the first input (1 for a scalar).
    pub rows: u64,
    pub nbytes: u64,
    pub key: Vec<(DType, Vec<u64>)>,
}

impl Job {
    /// What requests may share a batch with this one: per input its dtype, its dimensions
    /// after the first and its rank.
    pub fn key_of(inputs: &[Input]) -> Vec<(DType, Vec<u64>)> {
        inputs
            .iter()
            .map(|i| {
                let mut rest = i.dims.get(1..).map_or_else(Vec::new, |d| d.to_vec());
                rest.push(u64::MAX - i.dims.len() as u64); // rank 0 and rank 1 differ too
                (i.dtype, rest)
            })
            .collect()
    }
}

#[derive(Default)]
struct Lane {
    order: VecDeque<u64>,
    fifos: HashMap<u64, VecDeque<Job>>,
}

impl Lane {
    fn push(&mut self, job: Job) {
        let sid = job.session.id;
        let fifo = self.fifos.entry(sid).or_default();
        if fifo.is_empty() {
            self.order.push_back(sid);
        }
        fifo.push_back(job);
    }

    fn push_front(&mut self, job: Job) {
        let sid = job.session.id;
        let fifo = self.fifos.entry(sid).or_default();
        if fifo.is_empty() {
            self.order.push_front(sid);
        }
        fifo.push_front(job);
    }

    fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    fn count(&self, sid: u64) -> usize {
        self.fifos.get(&sid).map_or(0, |f| f.len())
    }

    /// Takes the newest request of a session out (it gets OVERLOADED instead).
    fn pop_newest(&mut self, sid: u64) -> Option<Job> {
        let fifo = self.fifos.get_mut(&sid)?;
        let job = fifo.pop_back();
        if fifo.is_empty() {
            self.fifos.remove(&sid);
            self.order.retain(|&o| o != sid);
        }
        job
    }

    /// The first request, in round-robin order, that `fits`; its session moves to the back.
    fn pick(&mut self, fits: impl Fn(&Job) -> bool) -> Option<Job> {
        for i in 0..self.order.len() {
            let sid = self.order[i];
            let fifo = self.fifos.get_mut(&sid).expect("listed sessions have a fifo");
            if !fits(fifo.front().expect("listed fifos are not empty")) {
                continue;
            }
            let job = fifo.pop_front().expect("checked");
            self.order.remove(i);
            if fifo.is_empty() {
                self.fifos.remove(&sid);
            } else {
                self.order.push_back(sid);
            }
            return Some(job);
        }
        None
    }

    fn drain(&mut self) -> Vec<Job> {
        self.order.clear();
        self.fifos.drain().flat_map(|(_, f)| f).collect()
    }
}

struct State {
    lanes: [Lane; 2], // normal, high
    length: u64,
    high_run: u32,
    retired: bool,
    /// Forward passes running now: batch id -> start.
    running: HashMap<u64, Instant>,
}

/// Counters of one model (SPEC `model_stats`), read at scrape time.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub served: u64,
    pub failed: u64,
    pub bad_input: u64,
    pub rejected: u64,
    pub expired: u64,
    pub batches: u64,
    pub batch_sizes: BTreeMap<u64, u64>,
    pub queue_us: u64,
    pub compute_us: u64,
    pub max_queue_us: u64,
    pub retried: u64,
}

pub struct Queue {
    pub id: u64,
    pub name: String,
    pub version: u64,
    pub sig: Signature,
    pub policy: Policy,
    /// Requests are joined (max_batch_size > 1 and every tensor has a leading batch dim).
    pub batching: bool,
    /// The core answers it itself (the built-in identity): no queue, no Python.
    pub identity: bool,
    state: Mutex<State>,
    cv: Condvar,
    pub stats: Mutex<Stats>,
    pub meters: Arc<Meters>,
    next_batch: AtomicU64,
    /// Where requests refused by a worker (values it checked) are logged, as the
    /// dispatcher logs its refusals.
    pub events: Option<Arc<Events>>,
}

/// Why put() refused a job: the queue is full (OVERLOADED) or the model is gone.
pub enum Refused {
    Full(Box<Job>, u64),
    Retired(Box<Job>),
}

impl std::fmt::Debug for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Full(j, n) => write!(f, "Full(request {}, max_queue {n})", j.request_id),
            Refused::Retired(j) => write!(f, "Retired(request {})", j.request_id),
        }
    }
}

impl Queue {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: u64,
        name: &str,
        version: u64,
        sig: Signature,
        policy: Policy,
        batching: bool,
        identity: bool,
        meters: Arc<Meters>,
    ) -> Queue {
        Queue {
            id,
            name: name.to_string(),
            version,
            sig,
            policy,
            batching,
            identity,
            state: Mutex::new(State {
                lanes: [Lane::default(), Lane::default()],
                length: 0,
                high_run: 0,
                retired: false,
                running: HashMap::new(),
            }),
            cv: Condvar::new(),
            stats: Mutex::new(Stats::default()),
            meters,
            next_batch: AtomicU64::new(1),
            events: None,
        }
    }

    /// The same queue, logging its workers' refusals through `events`.
    pub fn with_events(mut self, events: Arc<Events>) -> Queue {
        self.events = Some(events);
        self
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn stats(&self) -> MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn length(&self) -> u64 {
        self.lock().length
    }

    /// Queues a job. When the queue is full, OVERLOADED goes to whoever holds the most of
    /// it: a session holding fewer requests than the heaviest one (by two or more) takes the
    /// place of that session's newest request, which is returned to be answered OVERLOADED;
    /// otherwise the job itself is refused. One session flooding a model thus cannot make
    /// another's requests OVERLOADED.
    pub fn put(&self, mut job: Job) -> Result<Option<Job>, Refused> {
        let mut s = self.lock();
        if s.retired {
            return Err(Refused::Retired(Box::new(job)));
        }
        let mut evicted = None;
        if s.length >= self.policy.max_queue {
            let sid = job.session.id;
            let mine = s.lanes[0].count(sid) + s.lanes[1].count(sid);
            let heaviest = s.lanes[0]
                .fifos
                .keys()
                .chain(s.lanes[1].fifos.keys())
                .map(|&o| (s.lanes[0].count(o) + s.lanes[1].count(o), o))
                .max();
            match heaviest {
                Some((n, other)) if other != sid && n > mine + 1 => {
                    evicted = s.lanes[0].pop_newest(other).or_else(|| s.lanes[1].pop_newest(other));
                    s.length -= evicted.is_some() as u64;
                }
                _ => {}
            }
            if evicted.is_none() {
                drop(s);
                self.stats().rejected += 1;
                return Err(Refused::Full(Box::new(job), self.policy.max_queue));
            }
            self.stats().rejected += 1;
        }
        job.queued_at = Instant::now();
        let p = job.priority.min(1) as usize;
        s.lanes[p].push(job);
        s.length += 1;
        drop(s);
        self.cv.notify_one();
        Ok(evicted)
    }

    /// Stops taking requests; workers drain what is queued, then get None.
    pub fn retire(&self) {
        self.lock().retired = true;
        self.cv.notify_all();
    }

    /// Every queued request, taken out (to be answered without running).
    pub fn drain(&self) -> Vec<Job> {
        let mut s = self.lock();
        let mut jobs = s.lanes[1].drain();
        jobs.extend(s.lanes[0].drain());
        s.length = 0;
        jobs
    }

    /// Seconds the oldest forward pass running now has run.
    pub fn running_for(&self, now: Instant) -> f64 {
        self.lock().running.values().min().map_or(0.0, |&t| (now - t).as_secs_f64())
    }

    pub fn finished(&self, batch: u64) {
        self.lock().running.remove(&batch);
    }

    /// Blocks for the next batch (the caller has released the GIL). None once retired and
    /// drained. Returns the batch id and its jobs (expired ones included: the caller answers
    /// them DEADLINE).
    pub fn take(&self) -> Option<(u64, Vec<Job>)> {
        let mut s = self.lock();
        while s.length == 0 {
            if s.retired {
                return None;
            }
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        let limit = if self.batching { self.policy.max_batch_size.max(1) } else { 1 };
        let mut batch: Vec<Job> = Vec::new();
        let mut nbytes = 0u64;
        self.form(&mut s, &mut batch, &mut nbytes, limit);
        if self.batching && (batch.len() as u64) < limit && self.policy.max_queue_delay_us > 0 {
            // Wait for more, at most the delay counted from the oldest request.
            let end = batch[0].queued_at + Duration::from_micros(self.policy.max_queue_delay_us);
            while (batch.len() as u64) < limit {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                if s.length == 0 {
                    s = self.cv.wait_timeout(s, end - now).unwrap_or_else(|e| e.into_inner()).0;
                }
                let before = batch.len();
                self.form(&mut s, &mut batch, &mut nbytes, limit);
                if batch.len() == before && s.length > 0 {
                    break; // what waits cannot join this batch
                }
            }
        }
        if self.batching && !self.policy.preferred_batch_sizes.is_empty() {
            let n = batch.len() as u64;
            if let Some(&best) = self.policy.preferred_batch_sizes.iter().filter(|&&p| p <= n).max()
            {
                while batch.len() as u64 > best {
                    let job = batch.pop().expect("longer than best");
                    let p = job.priority.min(1) as usize;
                    s.lanes[p].push_front(job);
                    s.length += 1;
                }
            }
        }
        let id = self.next_batch.fetch_add(1, Ordering::Relaxed);
        s.running.insert(id, Instant::now());
        if s.length > 0 {
            self.cv.notify_one(); // another worker may start the next batch
        }
        Some((id, batch))
    }

    fn form(&self, s: &mut State, batch: &mut Vec<Job>, nbytes: &mut u64, limit: u64) {
        while (batch.len() as u64) < limit {
            let key = batch.first().map(|j| j.key.clone());
            let room = if self.policy.max_batch_bytes != 0 && !batch.is_empty() {
                Some(self.policy.max_batch_bytes.saturating_sub(*nbytes))
            } else {
                None
            };
            let fits = |j: &Job| {
                key.as_ref().is_none_or(|k| *k == j.key) && room.is_none_or(|r| j.nbytes <= r)
            };
            let both = !s.lanes[0].is_empty() && !s.lanes[1].is_empty();
            let order: [usize; 2] = if both && s.high_run >= HIGH_RUN { [0, 1] } else { [1, 0] };
            let mut got = None;
            for p in order {
                if let Some(j) = s.lanes[p].pick(fits) {
                    got = Some((p, j));
                    break;
                }
            }
            let Some((p, job)) = got else { break };
            s.high_run = if p == 1 && !s.lanes[0].is_empty() { s.high_run + 1 } else { 0 };
            s.length -= 1;
            *nbytes += job.nbytes;
            batch.push(job);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::tests::session;
    use crate::engine::Engine;
    use crate::signature::Signature;

    impl std::fmt::Debug for Job {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "Job({})", self.request_id)
        }
    }

    fn job(s: &Arc<Session>, rid: u64, priority: u8, width: u64) -> Job {
        let inputs = vec![Input {
            offset: 0,
            nbytes: 4 * width,
            dtype: DType::F32,
            dims: vec![1, width],
            unchecked: None,
        }];
        let now = Instant::now();
        Job {
            session: s.clone(),
            position: 0,
            request_id: rid,
            read_at: now,
            queued_at: now,
            deadline: None,
            priority,
            key: Job::key_of(&inputs),
            inputs,
            rows: 1,
            nbytes: 4 * width,
        }
    }

    fn queue(max_batch_size: u64, max_queue: u64) -> Queue {
        let policy = Policy { max_batch_size, max_queue, ..Default::default() };
        Queue::new(
            1,
            "m",
            1,
            Signature::new("m", vec![], 0, 0),
            policy,
            max_batch_size > 1,
            false,
            Default::default(),
        )
    }

    fn ids(batch: &[Job]) -> Vec<u64> {
        batch.iter().map(|j| j.request_id).collect()
    }

    #[test]
    fn sessions_take_turns_and_high_priority_leaves_normal_a_quarter() {
        let _fds = crate::engine::tests::FDS.lock().unwrap_or_else(|e| e.into_inner());
        let e = Engine::new(Duration::ZERO, 0, 0).unwrap();
        let (a, b) = (Arc::new(session(&e, 1)), Arc::new(session(&e, 2)));
        let q = queue(1, 100);
        for i in 0..6 {
            assert!(q.put(job(&a, 100 + i, 1, 4)).unwrap().is_none()); // a floods, high
        }
        for i in 0..2 {
            q.put(job(&b, 200 + i, 0, 4)).unwrap(); // b: normal
        }
        let order: Vec<u64> = (0..8).map(|_| q.take().unwrap().1[0].request_id).collect();
        assert_eq!(order, [100, 101, 102, 200, 103, 104, 105, 201]);
    }

    #[test]
    fn a_batch_joins_only_requests_of_its_first_ones_shape() {
        let _fds = crate::engine::tests::FDS.lock().unwrap_or_else(|e| e.into_inner());
        let e = Engine::new(Duration::ZERO, 0, 0).unwrap();
        let (a, b) = (Arc::new(session(&e, 1)), Arc::new(session(&e, 2)));
        let q = queue(8, 100);
        q.put(job(&a, 1, 0, 4)).unwrap();
        q.put(job(&a, 2, 0, 8)).unwrap(); // another width: waits for the next batch
        q.put(job(&b, 3, 0, 4)).unwrap();
        q.put(job(&b, 4, 0, 4)).unwrap();
        assert_eq!(ids(&q.take().unwrap().1), [1, 3, 4]);
        assert_eq!(ids(&q.take().unwrap().1), [2]);
    }

    #[test]
    fn a_full_queue_refuses_the_heaviest_session_not_a_newcomer() {
        let _fds = crate::engine::tests::FDS.lock().unwrap_or_else(|e| e.into_inner());
        let e = Engine::new(Duration::ZERO, 0, 0).unwrap();
        let (a, b) = (Arc::new(session(&e, 1)), Arc::new(session(&e, 2)));
        let q = queue(1, 3);
        for i in 0..3 {
            q.put(job(&a, i, 0, 4)).unwrap();
        }
        let evicted = q.put(job(&b, 9, 0, 4)).unwrap().expect("a's newest makes room");
        assert_eq!(evicted.request_id, 2);
        assert!(matches!(q.put(job(&a, 5, 0, 4)), Err(Refused::Full(..))));
        let order: Vec<u64> = (0..3).map(|_| q.take().unwrap().1[0].request_id).collect();
        assert_eq!(order, [0, 9, 1]);
    }
}
