//! chatloop: a real-time TCP chat server built as one single-threaded mio event loop.
pub mod buffer;
pub mod core;
pub mod id;
pub mod protocol;
pub mod timer;
