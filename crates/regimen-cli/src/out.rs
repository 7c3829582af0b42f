//! Standard output that a closed pipe does not stop: with `regimen train | head -3` training
//! goes on, and `--save` still writes the model, after `head` has exited; the rest of the
//! output is dropped quietly (Rust's `println!` would panic on the broken pipe). The same for
//! standard error (`tell!`: progress lines, notes, the final error), so that
//! `regimen train 2>&1 | head` does not lose the run either.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

static CLOSED: AtomicBool = AtomicBool::new(false);

/// Print nothing more on standard output (the ranks of a data-parallel run other than 0).
pub fn quiet() {
    CLOSED.store(true, Ordering::Relaxed);
}

/// Write one line to standard output, unless it has been closed.
pub fn line(args: std::fmt::Arguments<'_>) {
    if CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let mut out = std::io::stdout().lock();
    if out
        .write_fmt(args)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush())
        .is_err()
    {
        // A closed pipe (or a full disk behind a redirect): nothing more is printed.
        CLOSED.store(true, Ordering::Relaxed);
    }
}

/// `println!` that survives a closed standard output.
#[macro_export]
macro_rules! say {
    () => { $crate::out::line(format_args!("")) };
    ($($t:tt)*) => { $crate::out::line(format_args!($($t)*)) };
}

/// Write one line to standard error; a closed pipe drops it quietly.
pub fn err_line(args: std::fmt::Arguments<'_>) {
    let mut err = std::io::stderr().lock();
    let _ = err
        .write_fmt(args)
        .and_then(|()| err.write_all(b"\n"))
        .and_then(|()| err.flush());
}

/// `eprintln!` that survives a closed standard error.
#[macro_export]
macro_rules! tell {
    () => { $crate::out::err_line(format_args!("")) };
    ($($t:tt)*) => { $crate::out::err_line(format_args!($($t)*)) };
}
