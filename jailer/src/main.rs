//! `ironclad-jailer [options] -- PROGRAM [ARGS...]`: see the library's documentation.

use std::process::ExitCode;

use clap::Parser;
use ironclad_jailer::{libraries, spec, Args, JailSpec, JAIL_FAILED};
use ironclad_protocol::error_chain;

fn main() -> ExitCode {
    let args = Args::parse();
    let failed = match JailSpec::from_args(args, spec::system_binds(), libraries::of_program) {
        Ok(spec) => match ironclad_jailer::run(&spec) {
            Ok(never) => match never {},
            Err(err) => err,
        },
        Err(err) => err.into(),
    };
    eprintln!("ironclad-jailer: {}", error_chain(&failed));
    ExitCode::from(JAIL_FAILED)
}
