//! Paths of the freestanding test guests, built from `guests/*.c` by the build script.

include!(concat!(env!("OUT_DIR"), "/guests.rs"));
