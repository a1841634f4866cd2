//! The release's serving protocol (arcana/serve/controller.py, model_worker.py, constants.py): request
//! and reply bodies, the NUL-separated stream format, error codes and timing constants.
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// A worker whose last heart beat is older than this is dropped (`CONTROLLER_HEART_BEAT_EXPIRATION`).
pub const HEART_BEAT_EXPIRATION: Duration = Duration::from_secs(30);
/// How often a worker reports to the controller (`WORKER_HEART_BEAT_INTERVAL`).
pub const WORKER_HEART_BEAT_INTERVAL: Duration = Duration::from_secs(15);
/// The release's timeout for controller <-> worker status calls.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// Stream chunk error codes.
pub mod error_code {
    pub const OK: i32 = 0;
    pub const WORKER_ERROR: i32 = 1;
    pub const NO_WORKER: i32 = 2;
    pub const WORKER_UNREACHABLE: i32 = 3;
}

/// `/worker_get_status` reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub model_names: Vec<String>,
    pub speed: f64,
    pub queue_length: i64,
}

/// `/register_worker` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegisterWorker {
    pub worker_name: String,
    pub check_heart_beat: bool,
    #[serde(default)]
    pub worker_status: Option<WorkerStatus>,
}

/// `/receive_heart_beat` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeartBeat {
    pub worker_name: String,
    pub queue_length: i64,
}

/// `/unregister_worker` body (an addition to the release's protocol: a worker leaving on shutdown).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UnregisterWorker {
    pub worker_name: String,
}

/// `/receive_heart_beat` reply: `exist: false` asks the worker to register again.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeartBeatReply {
    pub exist: bool,
}

/// `/get_worker_address` body and reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelQuery {
    pub model: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerAddress {
    /// The worker's URL, or "" when no worker serves the model.
    pub address: String,
}

/// `/list_models` reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelList {
    pub models: Vec<String>,
}

/// One chunk of a `/worker_generate_stream` reply; on the wire each is its JSON followed by a NUL byte.
/// `text` is cumulative (prompt included, as the release's worker sends it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamChunk {
    pub text: String,
    pub error_code: i32,
    /// This server's addition, present when the request asked for `logprobs`: OpenAI's `logprobs`
    /// object (`{"content": [...]}`) for the tokens generated since the previous chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<serde_json::Value>,
}

impl StreamChunk {
    pub fn text(text: impl Into<String>) -> Self {
        Self { text: text.into(), error_code: error_code::OK, logprobs: None }
    }

    pub fn error(code: i32, text: impl Into<String>) -> Self {
        Self { text: text.into(), error_code: code, logprobs: None }
    }

    pub fn with_logprobs(self, logprobs: serde_json::Value) -> Self {
        Self { logprobs: Some(logprobs), ..self }
    }

    /// The chunk as sent: JSON, then `\0`.
    pub fn to_wire(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec());
        bytes.push(0);
        bytes
    }
}

/// Largest chunk accepted from a peer's stream: a chunk carries the cumulative text (prompt included),
/// far below this; a peer that sends more without a NUL is cut off instead of filling memory.
pub const MAX_CHUNK_BYTES: usize = 8 * 1024 * 1024;

/// Splits a NUL-delimited stream into chunks as bytes arrive; keeps a partial chunk for the next call.
/// Each byte is scanned once, however the stream is cut into reads.
#[derive(Debug, Default)]
pub struct ChunkSplitter {
    pending: Vec<u8>,
    /// Bytes of `pending` already known to hold no NUL.
    scanned: usize,
}

impl ChunkSplitter {
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Vec<u8>> {
        self.pending.extend_from_slice(bytes);
        let mut chunks = Vec::new();
        let mut start = 0;
        while let Some(offset) = self.pending[start + self.scanned..].iter().position(|&b| b == 0) {
            let end = start + self.scanned + offset;
            if end > start {
                chunks.push(self.pending[start..end].to_vec());
            }
            start = end + 1;
            self.scanned = 0;
        }
        self.pending.drain(..start);
        self.scanned = self.pending.len();
        chunks
    }

    /// Bytes after the last NUL (a stream cut short).
    pub fn remainder(&self) -> &[u8] {
        &self.pending
    }

    /// Whether the unfinished chunk is already longer than [`MAX_CHUNK_BYTES`].
    pub fn overflowed(&self) -> bool {
        self.pending.len() > MAX_CHUNK_BYTES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_split_on_nul_across_reads() {
        let mut s = ChunkSplitter::default();
        let a = StreamChunk::text("a\u{0}?".replace('\u{0}', "")).to_wire();
        let b = StreamChunk::error(1, "boom").to_wire();
        let all: Vec<u8> = a.iter().chain(&b).copied().collect();
        let (first, second) = all.split_at(5);
        assert!(s.push(first).is_empty());
        let chunks = s.push(second);
        assert_eq!(chunks.len(), 2);
        let parsed: StreamChunk = serde_json::from_slice(&chunks[1]).unwrap();
        assert_eq!(parsed, StreamChunk::error(1, "boom"));
        assert!(s.remainder().is_empty());
    }

    #[test]
    fn a_long_chunk_in_many_reads_is_scanned_once() {
        let mut s = ChunkSplitter::default();
        for _ in 0..100_000 {
            assert!(s.push(b"0123456789").is_empty());
        }
        assert_eq!(s.scanned, 1_000_000);
        let chunks = s.push(b"x\0y\0\0z");
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[0].len(), 1_000_001);
        assert_eq!(chunks[1], b"y");
        assert_eq!(s.remainder(), b"z");
        assert!(!s.overflowed());
        s.push(&vec![b'a'; MAX_CHUNK_BYTES]);
        assert!(s.overflowed());
    }
}
