//! chatloop: a real-time TCP chat server built as one single-threaded mio event loop.
pub mod buffer;
pub mod config;
pub mod core;
pub mod id;
pub mod limits;
pub mod protocol;
pub mod server;
pub mod timer;
