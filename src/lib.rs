//! chatloop: a real-time TCP chat server built as one single-threaded mio event loop.
pub mod protocol;
pub mod buffer;
pub mod timer;
