//! `mirrorctl`: the operator's tool. Commands arrive with the features they drive.

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "mirrorctl", version, about = "Operate mirrordisk mirror sets")]
struct Cli {}

fn main() {
    let _ = Cli::parse();
}
