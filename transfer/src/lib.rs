//! Certo's image transfer layer: moving image files from the image builder to the hosts'
//! image repositories while sending only the blocks a host lacks.
//!
//! * [`block_index`]: an image as a list of SHA-256 block hashes (fixed 4 KiB blocks, or
//!   content-defined chunks from [`chunker`]), and the index's binary encoding.
//! * [`repository`]: the host's content-addressed store of blocks and complete images.
//! * [`wire`]: what travels between sender and host, and the checks on it.
//! * [`server`]: the host's HTTP routes (axum), served by `certo agent`.
//! * [`http`]: the bounded serving loop of Certo's servers (connection and in-flight caps,
//!   header, idle and body deadlines, a bounded graceful shutdown).
//! * [`client`]: the sender (reqwest): `plan` and the pipelined, resumable `push`.
//! * [`steer`]: the zstd level of a push, steered between the link's rate and the
//!   compressors' speed.
//! * [`index_cache`]: the sender's cache of indexes, so an image pushed to many hosts is
//!   hashed once.
//!
//! It must never know about patches, releases, workflows or libvirt: it sees opaque image
//! files and block hashes, nothing else. Deciding which image goes to which host belongs
//! to the orchestrator.

pub mod block_index;
pub mod chunker;
pub mod client;
pub mod http;
pub mod index_cache;
pub mod repository;
pub mod server;
pub mod steer;
pub mod wire;

pub use block_index::{
    BlockEntry, BlockIndex, Chunking, DEFAULT_BLOCK_SIZE, FORMAT_VERSION, IndexError, MAGIC,
    MAX_BLOCK_SIZE, MIN_BLOCK_SIZE,
};
pub use client::{Client, ClientError, PlanSummary, PushOptions, PushSummary, RetryPolicy};
pub use index_cache::IndexCache;
pub use repository::{Manifest, RepoError, Repository};
pub use server::{Token, router};
