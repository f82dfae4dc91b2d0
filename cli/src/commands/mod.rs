//! One module per group of subcommands; [`run`] picks the one asked for.

pub mod jobs;
pub mod kv;
pub mod stats;
pub mod transfer;

use crate::args::{Cli, Command};
use crate::client::Client;
use crate::error::CliError;

/// Runs the command line's subcommand.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    let client = Client::new(&cli.global)?;
    match cli.command {
        Command::Get(args) => kv::get(&client, args).await,
        Command::Put(args) => kv::put(&client, args).await,
        Command::Delete(args) => kv::delete(&client, args).await,
        Command::List(args) => kv::list(&client, args).await,
        Command::Job(args) => jobs::job(&client, args).await,
        Command::Wait(args) => jobs::wait(&client, args).await,
        Command::Dead(args) => jobs::dead(&client, args).await,
        Command::Retry(args) => jobs::retry(&client, args).await,
        Command::Stats(args) => stats::stats(&client, args).await,
        Command::Import(args) => transfer::import(&client, args).await,
        Command::Export(args) => transfer::export(&client, args).await,
    }
}
