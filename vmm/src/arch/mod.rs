//! What is specific to the guest architecture. Only x86_64 is supported.

pub mod x86_64;
