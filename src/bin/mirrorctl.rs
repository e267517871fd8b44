//! `mirrorctl`: the operator's tool for mirrordisk mirror sets.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use mirrordisk::config::parse_size;
use mirrordisk::core::meta::{AL_SLOT_COUNT_DEFAULT, GRANULARITY_BYTES_DEFAULT};
use mirrordisk::shell::mirrorctl::{
    CreateArgs, create, inspect_device, parse_uuid, render_inspect,
};

#[derive(Debug, Parser)]
#[command(name = "mirrorctl", version, about = "Operate mirrordisk mirror sets")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

fn size(text: &str) -> Result<u64, String> {
    parse_size(text)
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write fresh mirror metadata (a CLUSTER partition) to a device. Run it on both
    /// nodes with the same --mirror and --data-size; the disk starts Inconsistent.
    Create {
        /// The data device (or file). Its head becomes the CLUSTER partition unless
        /// --metadata names another device.
        device: PathBuf,
        /// Mirror name; both nodes' disks of one mirror must use the same name.
        #[arg(long)]
        mirror: String,
        /// This node's id (as in the cluster configuration).
        #[arg(long)]
        node: u32,
        /// The peer node's id.
        #[arg(long)]
        peer: u32,
        /// Put the CLUSTER partition on this device instead of the data device's head.
        #[arg(long, value_name = "DEVICE")]
        metadata: Option<PathBuf>,
        /// Size of the data partition (default: all that fits). Use the same value on
        /// both nodes when their disks differ in size.
        #[arg(long, value_name = "SIZE", value_parser = size)]
        data_size: Option<u64>,
        /// Size of the CLUSTER partition (default: room for the worst-case bitmap).
        #[arg(long, value_name = "SIZE", value_parser = size)]
        cluster_size: Option<u64>,
        /// Bitmap granularity, a power of two from 4K to 1M.
        #[arg(long, value_name = "SIZE", value_parser = size, default_value_t = u64::from(GRANULARITY_BYTES_DEFAULT))]
        granularity: u64,
        /// Activity-log slots (4 MiB extents each).
        #[arg(long, value_name = "N", default_value_t = AL_SLOT_COUNT_DEFAULT)]
        al_extents: u32,
        /// Mirror-set UUID (default: derived from --mirror).
        #[arg(long, value_name = "UUID", value_parser = parse_uuid)]
        uuid: Option<[u8; 16]>,
        /// Overwrite a device that already holds metadata, a filesystem or a partition table.
        #[arg(long)]
        force: bool,
    },
    /// Show a device's mirror metadata: identity, generations, states, journal.
    Inspect {
        device: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Also list the dirty byte ranges of the data partition.
        #[arg(long)]
        regions: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Create {
            device,
            mirror,
            node,
            peer,
            metadata,
            data_size,
            cluster_size,
            granularity,
            al_extents,
            uuid,
            force,
        } => match u32::try_from(granularity) {
            Err(_) => Err(format!("--granularity {granularity} is out of range")),
            Ok(granularity_bytes) => create(&CreateArgs {
                device,
                mirror,
                node,
                peer,
                metadata,
                data_bytes: data_size,
                cluster_bytes: cluster_size,
                granularity_bytes,
                al_slot_count: al_extents,
                mirror_uuid: uuid,
                force,
            }),
        },
        Command::Inspect {
            device,
            json,
            regions,
        } => inspect_device(&device, regions).map(|report| {
            if json {
                serde_json::to_string_pretty(&report).expect("inspect report serialises")
            } else {
                render_inspect(&report)
            }
        }),
    };
    match result {
        Ok(text) => {
            println!("{}", text.trim_end());
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("mirrorctl: error: {message}");
            ExitCode::FAILURE
        }
    }
}
