//! The engine on its own thread: a queue of requests in, one event channel out per request.
use super::events::{Completion, CompletionBuilder, Event};
use super::request::Request;
use super::Engine;
use crate::error::{Error, Result};
use crate::generate::Flow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

/// Cancels one answer before its next token; clones share the flag.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

struct Job {
    request: Request,
    events: Sender<Result<Event>>,
    cancel: CancelToken,
}

/// Submits requests to the engine thread. Cheap to clone; send one to each thread that needs it.
#[derive(Clone)]
pub struct EngineHandle {
    jobs: Sender<Job>,
}

/// The events of one request as they come; ends after `Finished` or an error.
pub struct ResponseStream {
    events: Receiver<Result<Event>>,
    cancel: CancelToken,
}

pub(super) fn spawn(engine: Engine) -> Result<(EngineHandle, std::thread::JoinHandle<()>)> {
    let (jobs, queue) = channel::<Job>();
    let thread = std::thread::Builder::new()
        .name("arcana-engine".into())
        .spawn(move || serve(engine, queue))
        .map_err(|e| Error::Engine(format!("cannot start the engine thread: {e}")))?;
    Ok((EngineHandle { jobs }, thread))
}

fn serve(engine: Engine, queue: Receiver<Job>) {
    tch::set_num_threads(engine.threads() as i32);
    for job in queue {
        let Job { request, events, cancel } = job;
        let result = engine.generate(&request, |event| {
            // A dropped stream means nobody reads the answer any more.
            let delivered = events.send(Ok(event)).is_ok();
            if delivered && !cancel.is_cancelled() {
                Flow::Continue
            } else {
                Flow::Stop
            }
        });
        if let Err(e) = result {
            let _ = events.send(Err(e));
        }
    }
}

impl EngineHandle {
    /// Queues `request`; its events come on the returned stream.
    pub fn submit(&self, request: Request) -> Result<ResponseStream> {
        let (events, receiver) = channel();
        let cancel = CancelToken::default();
        self.jobs
            .send(Job { request, events, cancel: cancel.clone() })
            .map_err(|_| Error::Engine("the engine thread has stopped".into()))?;
        Ok(ResponseStream { events: receiver, cancel })
    }

    /// Submits `request` and waits for its whole answer.
    pub fn complete(&self, request: Request) -> Result<Completion> {
        self.submit(request)?.completion()
    }
}

impl ResponseStream {
    pub fn cancel_token(&self) -> CancelToken {
        self.cancel.clone()
    }

    /// Waits for the rest of the answer.
    pub fn completion(self) -> Result<Completion> {
        let mut builder = CompletionBuilder::default();
        for event in self {
            builder.push(&event?);
        }
        builder.finish()
    }
}

impl Iterator for ResponseStream {
    type Item = Result<Event>;

    fn next(&mut self) -> Option<Self::Item> {
        self.events.recv().ok()
    }
}

#[allow(dead_code)]
fn assert_send() {
    fn send<T: Send>() {}
    send::<Engine>();
    send::<Request>();
    send::<EngineHandle>();
    send::<ResponseStream>();
    send::<CancelToken>();
}
