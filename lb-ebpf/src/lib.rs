//! Empty library target: lb-userspace build-depends on this crate so that cargo rebuilds it
//! when the eBPF sources change (the programs themselves are in the `lb-ebpf` binary).
#![no_std]
