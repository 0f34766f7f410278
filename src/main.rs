//! The `rimg` binary: parses the command line with clap and hands each
//! subcommand to [`cli`], which drives the library and reports errors as one
//! line (exit 1; `grep` exits 0, 1 or 2 as grep does).

use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand};

mod cli;

use cli::{Common, ExportArgs, GrepArgs, LsArgs, MountArgs};

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
    /// Seconds one operation (resolving an image, a page of tags, a layer
    /// without a new byte) keeps trying before it fails.
    #[arg(long, global = true, env = "RIMG_TIMEOUT", value_name = "SECS")]
    timeout: Option<u64>,
    /// Seconds without a byte from the registry before a connection counts as stalled.
    #[arg(long, global = true, env = "RIMG_STALL_TIMEOUT", value_name = "SECS")]
    stall_timeout: Option<u64>,
    /// Attempts per request on network errors, 5xx and 429.
    #[arg(long, global = true, env = "RIMG_RETRIES", value_name = "N")]
    retries: Option<u32>,
    /// Fetch foreign layers from the URLs their descriptors list (HTTPS, or HTTP on loopback).
    #[arg(long, global = true)]
    allow_foreign_layers: bool,
    /// Never read layers by range: fetch every layer whole, even eStargz,
    /// zstd:chunked and gzip layers with a published index.
    #[arg(long, global = true)]
    whole_layers: bool,
    /// Ignore published gzip indexes (`rimg index push`); TOC layers are
    /// still read by range.
    #[arg(long, global = true)]
    no_index: bool,
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
    Tags {
        repository: String,
        /// One JSON object per tag and line.
        #[arg(long)]
        json: bool,
    },
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
        /// List one layer as stored, whiteouts included (negative counts from the top).
        #[arg(long, allow_hyphen_values = true)]
        layer: Option<i64>,
        /// One JSON object per entry and line (the fields of `-l`).
        #[arg(long)]
        json: bool,
    },
    /// Write a file of the image to stdout (symlinks followed inside the image).
    Cat {
        reference: String,
        /// Any bytes: names need not be UTF-8.
        path: std::ffi::OsString,
        /// Read from one layer as stored, e.g. a file a later layer deleted
        /// (negative counts from the top).
        #[arg(long, allow_hyphen_values = true)]
        layer: Option<i64>,
    },
    /// Every layer that changed PATH, oldest first, and how.
    Log {
        reference: String,
        path: std::ffi::OsString,
        /// Everything below PATH too.
        #[arg(short = 'R')]
        recursive: bool,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Entries some layer holds that the merged tree does not show, and what hid them.
    Deleted {
        reference: String,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Paths that differ between two images: A(dded), D(eleted), M(odified).
    Diff {
        reference_a: String,
        reference_b: String,
        /// Say what changed in each modified path.
        #[arg(long)]
        long: bool,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Search file contents of the merged tree, without a mount; exit 0 if
    /// found, 1 if not, 2 on error, as grep.
    Grep {
        pattern: String,
        reference: String,
        /// Search only below these paths.
        paths: Vec<std::ffi::OsString>,
        #[arg(short = 'i')]
        ignore_case: bool,
        /// PATTERN is a (Rust syntax) extended regular expression; the default.
        #[arg(short = 'E', conflicts_with = "fixed")]
        extended: bool,
        /// PATTERN is a fixed string.
        #[arg(short = 'F')]
        fixed: bool,
        /// Only the names of files that match.
        #[arg(short = 'l')]
        files_with_matches: bool,
        /// Only a count of matching lines per file.
        #[arg(short = 'c')]
        count: bool,
        /// Line numbers.
        #[arg(short = 'n')]
        line_number: bool,
        /// Say which layer each match came from.
        #[arg(long)]
        layers: bool,
        /// Also search what later layers deleted (where leaked secrets hide).
        #[arg(long)]
        deleted: bool,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
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
    Mounts {
        /// One JSON object per mount and line.
        #[arg(long)]
        json: bool,
    },
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
        /// Layer compression: as stored (keep), or gzip, re-encoding zstd and
        /// uncompressed layers for engines that load only gzip (docker 20.10).
        #[arg(long, default_value = "keep", value_parser = ["keep", "gzip"])]
        compress: String,
    },
    /// Gzip checkpoint indexes: read plain gzip layers by range elsewhere.
    Index {
        #[command(subcommand)]
        action: IndexAction,
    },
    /// Show or free the layer cache.
    Cache {
        #[command(subcommand)]
        action: CacheAction,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Write the manual pages (rimg.1 and one per subcommand) to DIR, or rimg.1 to stdout.
    Man {
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Internal: serve a mount in the background (started by `rimg mount`).
    #[command(hide = true)]
    Serve {
        reference: String,
        mountpoint: PathBuf,
        #[arg(long)]
        allow_other: bool,
        #[arg(long)]
        prefetch: bool,
        #[arg(long, allow_hyphen_values = true)]
        layer: Option<i64>,
    },
}

#[derive(Subcommand)]
enum IndexAction {
    /// Build the gzip checkpoint index of every gzip layer (fetching the
    /// layers whole if need be) and print its size against the layer's.
    Build { reference: String },
    /// Build the indexes and push them as an artifact referring to the
    /// image, so other machines read its gzip layers by range.
    Push { reference: String },
}

#[derive(Subcommand)]
enum CacheAction {
    /// Cached layers with sizes, last use and the images they belong to.
    Ls {
        /// One JSON object per cached layer and line.
        #[arg(long)]
        json: bool,
    },
    /// Evict least-recently-used layers until the cache fits SIZE (default: the limit).
    Prune { size: Option<String> },
    /// Remove everything not in use by a running mount.
    Clear,
    /// Re-hash every cached layer against its digest and diff_id; remove corrupt ones.
    Verify,
}

/// An image of up to 1000 layers keeps two files open per layer, past the
/// usual soft limit of 1024: raise it to the hard limit, as Go programs do.
fn raise_open_file_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit with a valid, initialised struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn main() -> ExitCode {
    raise_open_file_limit();
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
        timeout: g.timeout,
        stall_timeout: g.stall_timeout,
        retries: g.retries,
        allow_foreign_layers: g.allow_foreign_layers,
        whole_layers: g.whole_layers,
        no_index: g.no_index,
    };
    let result = match cli.command {
        Command::Inspect { reference, raw } => cli::inspect(&common, &reference, raw),
        Command::Tags { repository, json } => cli::tags(&common, &repository, json),
        Command::Ls {
            reference,
            path,
            long,
            recursive,
            layer,
            json,
        } => cli::ls(
            &common,
            &LsArgs {
                reference,
                path: path.into_vec(),
                layer,
                long,
                recursive,
                json,
            },
        ),
        Command::Cat {
            reference,
            path,
            layer,
        } => cli::cat(&common, &reference, path.as_bytes(), layer),
        Command::Log {
            reference,
            path,
            recursive,
            json,
        } => cli::log(&common, &reference, path.as_bytes(), recursive, json),
        Command::Deleted { reference, json } => cli::deleted(&common, &reference, json),
        Command::Diff {
            reference_a,
            reference_b,
            long,
            json,
        } => cli::diff(&common, &reference_a, &reference_b, long, json),
        Command::Grep {
            pattern,
            reference,
            paths,
            ignore_case,
            extended: _,
            fixed,
            files_with_matches,
            count,
            line_number,
            layers,
            deleted,
            json,
        } => {
            let args = GrepArgs {
                pattern,
                reference,
                paths: paths.into_iter().map(|p| p.into_vec()).collect(),
                ignore_case,
                fixed,
                files_with_matches,
                count,
                line_number,
                layers,
                deleted,
                json,
            };
            // grep's exit status: 0 found, 1 not found, 2 trouble.
            return match cli::grep(&common, &args) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e) => {
                    print_error(&e);
                    ExitCode::from(2)
                }
            };
        }
        Command::Mount {
            reference,
            mountpoint,
            foreground,
            allow_other,
            prefetch,
            layer,
        } => cli::mount(
            &common,
            &MountArgs {
                reference,
                mountpoint,
                foreground,
                allow_other,
                prefetch,
                layer,
            },
        ),
        Command::Serve {
            reference,
            mountpoint,
            allow_other,
            prefetch,
            layer,
        } => cli::serve(
            &common,
            &MountArgs {
                reference,
                mountpoint,
                foreground: true,
                allow_other,
                prefetch,
                layer,
            },
        ),
        Command::Umount { mountpoint } => cli::umount(&mountpoint),
        Command::Mounts { json } => cli::mounts(json),
        Command::Completions { shell } => cli::completions(Cli::command(), shell),
        Command::Man { dir } => cli::man(Cli::command(), dir.as_deref()),
        Command::Export {
            reference,
            output,
            format,
            flatten,
            tag,
            compress,
        } => cli::export(
            &common,
            &ExportArgs {
                reference,
                output,
                format,
                flatten,
                tag,
                compress,
            },
        ),
        Command::Index { action } => match action {
            IndexAction::Build { reference } => cli::index(&common, &reference, false),
            IndexAction::Push { reference } => cli::index(&common, &reference, true),
        },
        Command::Cache { action } => match action {
            CacheAction::Ls { json } => cli::cache_ls(&common, json),
            CacheAction::Prune { size } => cli::cache_prune(&common, size.as_deref()),
            CacheAction::Clear => cli::cache_clear(&common),
            CacheAction::Verify => cli::cache_verify(&common),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            print_error(&e);
            ExitCode::FAILURE
        }
    }
}

/// The one line a failed command prints.
fn print_error(e: &anyhow::Error) {
    // Registry text may hold terminal control sequences.
    eprintln!(
        "rimg: {}",
        rimg::registry::escape_controls(&cli::one_line(e))
    );
}
