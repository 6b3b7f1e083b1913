//! ironclad-vmm: one KVM microVM per sandbox.
//!
//! The VM is described by [`config::VmConfig`], validated as a whole before any KVM call.

pub mod config;
