//! `no-io-uring PROGRAM ARGS...`: runs PROGRAM with io_uring blocked by a seccomp
//! filter (io_uring_setup, io_uring_enter and io_uring_register fail with ENOSYS), as
//! on a host whose container profile forbids it. The tests use it to prove the server's
//! automatic fallback to the mio runtime for real.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::process::Command;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

fn main() {
    let mut args = std::env::args_os().skip(1);
    let Some(program) = args.next() else {
        eprintln!("usage: no-io-uring PROGRAM [ARGS...]");
        std::process::exit(2);
    };
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = [
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
    ]
    .into_iter()
    .map(|nr| (nr, vec![]))
    .collect();
    let arch: TargetArch = match std::env::consts::ARCH.try_into() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("no-io-uring: unsupported architecture: {e:?}");
            std::process::exit(2);
        }
    };
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .and_then(BpfProgram::try_from);
    let prog = match filter {
        Ok(p) => p,
        Err(e) => {
            eprintln!("no-io-uring: building the seccomp filter: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = seccompiler::apply_filter(&prog) {
        eprintln!("no-io-uring: applying the seccomp filter: {e}");
        std::process::exit(2);
    }
    let err = Command::new(&program).args(args).exec();
    eprintln!(
        "no-io-uring: cannot run {}: {err}",
        program.to_string_lossy()
    );
    std::process::exit(127);
}
