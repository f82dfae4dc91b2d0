//! Group commit: callers that each want one small Redis call made hand it
//! to a task that makes the calls waiting together as one (one script call,
//! one pipeline, one `WAIT`), and answers each caller its own part. A
//! caller alone waits for one round trip, as before; callers arriving while
//! a call is in flight wait for it and go together in the next one. This is
//! how Kafka producers (`linger.ms = 0`) and databases' group commit turn
//! round trips and syscalls per item into round trips per group.
//!
//! A [`GroupCommit`] has `lanes` (partitions, hash slots): items of one lane
//! go together, lanes run independently. Each lane's task starts on first
//! use, on the runtime of its caller, and ends when the `GroupCommit` is
//! dropped.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// What a group commit does with a group.
pub trait Flush: Send + Sync + 'static {
    /// What a caller hands in.
    type Item: Send + 'static;
    /// What a caller gets back.
    type Answer: Send + 'static;

    /// Makes the call for `items`, all of lane `lane`, and answers one
    /// answer per item, in order.
    fn flush(&self, lane: usize, items: Vec<Self::Item>) -> BoxFuture<'_, Vec<Self::Answer>>;

    /// The item's size, counted against [`Limits::bytes`].
    fn bytes(item: &Self::Item) -> usize;

    /// The answer to an item that was not sent: it waited longer than
    /// [`Limits::stale_after`] (the server stalls), or the lane's task
    /// could not run.
    fn unsent(item: Self::Item, why: &str) -> Self::Answer;

    /// The answer to an item whose answer was lost: the lane's task stopped
    /// with it (its runtime shut down), sent or not.
    fn lost() -> Self::Answer;
}

/// How large a group may grow.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Items in one call at most.
    pub items: usize,
    /// Bytes of items in one call, about: the first item always goes,
    /// however large.
    pub bytes: usize,
    /// An item that waited this long to be sent is answered
    /// [`Flush::unsent`] instead: its caller would time out anyway, and a
    /// stalled server is not sent more work.
    pub stale_after: Duration,
}

struct Waiting<F: Flush> {
    item: F::Item,
    since: Instant,
    reply: oneshot::Sender<F::Answer>,
}

/// Group commit over `F` (see the module's doc). Cheap to clone; clones
/// share the lanes.
pub struct GroupCommit<F: Flush> {
    flush: Arc<F>,
    limits: Limits,
    lanes: Arc<Vec<Lane<F>>>,
}

/// A lane's task, once started: where its items go.
type Lane<F> = Mutex<Option<mpsc::Sender<Waiting<F>>>>;

impl<F: Flush> Clone for GroupCommit<F> {
    fn clone(&self) -> Self {
        Self {
            flush: self.flush.clone(),
            limits: self.limits,
            lanes: self.lanes.clone(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each use swaps one value: a panic cannot leave it half-done.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<F: Flush> GroupCommit<F> {
    /// Group commit over `flush`, with `lanes` lanes.
    pub fn new(flush: F, lanes: usize, limits: Limits) -> Self {
        Self {
            flush: Arc::new(flush),
            limits,
            lanes: Arc::new((0..lanes.max(1)).map(|_| Mutex::new(None)).collect()),
        }
    }

    /// What the calls are made with.
    pub fn inner(&self) -> &F {
        &self.flush
    }

    /// Hands `item` to lane `lane`'s next call and answers its part.
    pub async fn submit(&self, lane: usize, item: F::Item) -> F::Answer {
        let lane = lane % self.lanes.len();
        let (reply, answer) = oneshot::channel();
        let mut waiting = Waiting {
            item,
            since: Instant::now(),
            reply,
        };
        // A task gone (the runtime that ran it stopped) is started again.
        for _ in 0..2 {
            match self.sender(lane).send(waiting).await {
                Ok(()) => {
                    return answer.await.unwrap_or_else(|_| F::lost());
                }
                Err(mpsc::error::SendError(back)) => {
                    waiting = back;
                    *lock(&self.lanes[lane]) = None;
                }
            }
        }
        F::unsent(waiting.item, "the group commit task cannot start")
    }

    fn sender(&self, lane: usize) -> mpsc::Sender<Waiting<F>> {
        let mut slot = lock(&self.lanes[lane]);
        if let Some(tx) = slot.as_ref().filter(|tx| !tx.is_closed()) {
            return tx.clone();
        }
        let (tx, rx) = mpsc::channel(self.limits.items.max(1) * 4);
        tokio::spawn(run(self.flush.clone(), self.limits, lane, rx));
        *slot = Some(tx.clone());
        tx
    }
}

/// One lane: takes every item waiting, up to the limits, makes one call,
/// answers each, and goes on until every sender is gone.
async fn run<F: Flush>(
    flush: Arc<F>,
    limits: Limits,
    lane: usize,
    mut rx: mpsc::Receiver<Waiting<F>>,
) {
    let mut carry: Option<Waiting<F>> = None;
    loop {
        let first = match carry.take() {
            Some(first) => first,
            None => match rx.recv().await {
                Some(first) => first,
                None => return,
            },
        };
        let mut bytes = F::bytes(&first.item);
        let mut group = vec![first];
        while group.len() < limits.items {
            let Ok(next) = rx.try_recv() else { break };
            let more = F::bytes(&next.item);
            if bytes.saturating_add(more) > limits.bytes {
                carry = Some(next);
                break;
            }
            bytes += more;
            group.push(next);
        }
        let mut items = Vec::with_capacity(group.len());
        let mut replies = Vec::with_capacity(group.len());
        for waiting in group {
            if waiting.since.elapsed() > limits.stale_after {
                let _ = waiting.reply.send(F::unsent(
                    waiting.item,
                    "the server is slow: it waited too long to be sent, and was not",
                ));
            } else {
                items.push(waiting.item);
                replies.push(waiting.reply);
            }
        }
        if items.is_empty() {
            continue;
        }
        let answers = flush.flush(lane, items).await;
        // A reply without an answer (never: a flush answers every item)
        // is dropped, and its caller gets `lost`.
        for (reply, answer) in replies.into_iter().zip(answers) {
            let _ = reply.send(answer);
        }
    }
}
