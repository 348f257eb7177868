//! Certo's image transfer layer: moving image files between the image builder and the
//! hosts' image repositories while sending only the blocks a host lacks.
//!
//! This crate is responsible for describing image files as content (fixed-size block
//! indexes, their digests and their binary encoding) and, later, for the delta transfer
//! built on them.
//!
//! It must never know about patches, releases, workflows or libvirt: it sees opaque image
//! files and block hashes, nothing else. Deciding which image goes to which host belongs
//! to the orchestrator.

pub mod block_index;

pub use block_index::{
    BlockEntry, BlockIndex, DEFAULT_BLOCK_SIZE, FORMAT_VERSION, IndexError, MAGIC, MAX_BLOCK_SIZE,
    MIN_BLOCK_SIZE,
};
