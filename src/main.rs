//! The `layerfs` binary: parse, run, map errors to exit codes.

use std::process::ExitCode;

use clap::Parser;
use layerfs::cli::{Cli, Command};
use layerfs::{commands, daemon};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let debug = cli.compat.debug;
    // A reply to a request the kernel already dropped (its caller was
    // interrupted) fails with ENOENT: normal, not worth an error line.
    let default_level = if debug {
        "debug"
    } else {
        "warn,fuser::reply=off"
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_level))
        .format_timestamp_millis()
        .init();
    let run = match cli.command {
        Some(Command::Mount(m)) => daemon::mount_from_args(m).map(|()| 0),
        Some(Command::Diff(d)) => commands::diff_cmd(d).map(|()| 0),
        Some(Command::Run(r)) => commands::run_cmd(r),
        Some(Command::Import(a)) => layerfs::oci::cmd::import_cmd(a).map(|()| 0),
        Some(Command::Export(a)) => layerfs::oci::cmd::export_cmd(a).map(|()| 0),
        Some(Command::Check(a)) => layerfs::check::check_cmd(a),
        Some(Command::Generate(g)) => layerfs::docs::generate_cmd(g).map(|()| 0),
        None => daemon::mount_from_compat(cli.compat).map(|()| 0),
    };
    match run {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(msg) => {
            eprintln!("layerfs: {msg}");
            ExitCode::FAILURE
        }
    }
}
