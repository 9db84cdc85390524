#![no_std]
// The programs live in the `ctrace` binary target (src/main.rs); this library only exists so
// that `ctrace`'s build script can depend on the crate and be rebuilt when it changes.
