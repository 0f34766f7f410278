use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use rimg::commands::{self, Common, ExportArgs, LsArgs, MountArgs};

/// Mount, inspect and export container images straight from a registry.
#[derive(Parser)]
#[command(
    name = "rimg",
    version,
    about,
    after_help = "REF is a registry reference (alpine:3.10, docker://host:5000/repo:tag) or an image in a file: docker-archive:PATH[:REPO:TAG], oci:DIR[:TAG], oci-archive:PATH[:TAG]."
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Global {
    /// Platform to choose from multi-arch images (os/arch[/variant]); default: this host's.
    #[arg(long, global = true)]
    platform: Option<String>,
    /// Registry user name; the password is read from stdin (--password-stdin).
    #[arg(long, global = true)]
    username: Option<String>,
    /// Read the registry password (or token) from standard input.
    #[arg(long, global = true)]
    password_stdin: bool,
    /// Talk plain HTTP to the registry (loopback registries may use it anyway).
    #[arg(long, global = true)]
    plain_http: bool,
    /// Do not verify the registry's TLS certificate.
    #[arg(long, global = true)]
    insecure: bool,
    /// Extra CA certificate (PEM) to trust.
    #[arg(long, global = true, value_name = "FILE")]
    ca_cert: Vec<PathBuf>,
    /// Registry mirror: URL (for docker.io) or HOST=URL; repeatable. Also RIMG_MIRRORS (comma-separated).
    #[arg(long, global = true, value_name = "URL")]
    mirror: Vec<String>,
    /// Cache directory (default $RIMG_CACHE_DIR, $XDG_CACHE_HOME/rimg or ~/.cache/rimg).
    #[arg(long, global = true, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Cache size limit, e.g. 10G, 500M (default 10G).
    #[arg(long, global = true, value_name = "SIZE")]
    cache_size: Option<String>,
    /// Refuse layers that inflate past this size, e.g. 20G (default: the cache size).
    #[arg(long, global = true, value_name = "SIZE")]
    max_layer_size: Option<String>,
    /// More logging (-v info, -vv debug); RIMG_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
}

#[derive(Subcommand)]
enum Command {
    /// Print an image's resolved reference, platform, manifest, config and layers as JSON.
    Inspect {
        reference: String,
        /// Print the manifest bytes exactly as served.
        #[arg(long)]
        raw: bool,
    },
    /// List a repository's tags.
    Tags { repository: String },
    /// List the image's merged filesystem.
    Ls {
        reference: String,
        /// Any bytes: names need not be UTF-8.
        #[arg(default_value = "/")]
        path: std::ffi::OsString,
        /// Long form: type, mode, owner, size, mtime, link target, layer.
        #[arg(short = 'l')]
        long: bool,
        /// Recurse into directories.
        #[arg(short = 'R')]
        recursive: bool,
    },
    /// Write a file of the image to stdout (symlinks followed inside the image).
    Cat {
        reference: String,
        /// Any bytes: names need not be UTF-8.
        path: std::ffi::OsString,
    },
    /// Mount the image read-only at MOUNTPOINT.
    Mount {
        reference: String,
        mountpoint: PathBuf,
        /// Serve in the foreground instead of returning once mounted.
        #[arg(long)]
        foreground: bool,
        /// Let other users see the mount (needs user_allow_other for non-root).
        #[arg(long)]
        allow_other: bool,
        /// Fetch every layer in parallel right after mounting.
        #[arg(long)]
        prefetch: bool,
        /// Mount one layer's own tree (0 = bottom, negative counts from the top).
        #[arg(long, allow_hyphen_values = true)]
        layer: Option<i64>,
    },
    /// Unmount a rimg mount.
    Umount { mountpoint: PathBuf },
    /// List rimg mounts.
    Mounts,
    /// Write the image as a docker/OCI archive or a rootfs tar.
    Export {
        reference: String,
        /// Output file, or - for stdout.
        output: String,
        #[arg(long, default_value = "docker", value_parser = ["docker", "oci", "rootfs"])]
        format: String,
        /// One layer holding the merged filesystem.
        #[arg(long)]
        flatten: bool,
        /// Image name in the archive (default: the reference).
        #[arg(long, value_name = "NAME:TAG")]
        tag: Option<String>,
    },
    /// Show or free the layer cache.
    Cache {
        #[command(subcommand)]
        action: CacheAction,
    },
    /// Internal: serve a mount in the background (started by `rimg mount`).
    #[command(hide = true)]
    Serve {
        reference: String,
        mountpoint: PathBuf,
        #[arg(long)]
        ready_fd: Option<i32>,
        #[arg(long)]
        allow_other: bool,
        #[arg(long)]
        prefetch: bool,
        #[arg(long, allow_hyphen_values = true)]
        layer: Option<i64>,
    },
}

#[derive(Subcommand)]
enum CacheAction {
    /// Cached layers with sizes, last use and the images they belong to.
    Ls,
    /// Evict least-recently-used layers until the cache fits SIZE (default: the limit).
    Prune { size: Option<String> },
    /// Remove everything not in use by a running mount.
    Clear,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let g = cli.global;
    let common = Common {
        platform: g.platform,
        username: g.username,
        password_stdin: g.password_stdin,
        plain_http: g.plain_http,
        insecure: g.insecure,
        ca_certs: g.ca_cert,
        mirrors: g.mirror,
        cache_dir: g.cache_dir,
        cache_size: g.cache_size,
        max_layer_size: g.max_layer_size,
        verbose: g.verbose,
    };
    let result = match cli.command {
        Command::Inspect { reference, raw } => commands::inspect(&common, &reference, raw),
        Command::Tags { repository } => commands::tags(&common, &repository),
        Command::Ls {
            reference,
            path,
            long,
            recursive,
        } => commands::ls(
            &common,
            &LsArgs {
                reference,
                path: path.into_vec(),
                long,
                recursive,
            },
        ),
        Command::Cat { reference, path } => commands::cat(&common, &reference, path.as_bytes()),
        Command::Mount {
            reference,
            mountpoint,
            foreground,
            allow_other,
            prefetch,
            layer,
        } => commands::mount(
            &common,
            &MountArgs {
                reference,
                mountpoint,
                foreground,
                allow_other,
                prefetch,
                layer,
                ready_fd: None,
            },
        ),
        Command::Serve {
            reference,
            mountpoint,
            ready_fd,
            allow_other,
            prefetch,
            layer,
        } => commands::serve(
            &common,
            &MountArgs {
                reference,
                mountpoint,
                foreground: true,
                allow_other,
                prefetch,
                layer,
                ready_fd,
            },
        ),
        Command::Umount { mountpoint } => commands::umount(&mountpoint),
        Command::Mounts => commands::mounts(),
        Command::Export {
            reference,
            output,
            format,
            flatten,
            tag,
        } => commands::export(
            &common,
            &ExportArgs {
                reference,
                output,
                format,
                flatten,
                tag,
            },
        ),
        Command::Cache { action } => match action {
            CacheAction::Ls => commands::cache_ls(&common),
            CacheAction::Prune { size } => commands::cache_prune(&common, size.as_deref()),
            CacheAction::Clear => commands::cache_clear(&common),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rimg: {}", commands::one_line(&e));
            ExitCode::FAILURE
        }
    }
}
