//! `tmdb-proxy`: parse arguments, load the config, serve until a signal.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tmdb_proxy::server::{self, Server};
use tmdb_proxy::{Config, Proxy, admin, telemetry};

/// Exit code for an invalid configuration (EX_CONFIG would be 78; EX_USAGE-style 64 is what
/// service managers commonly treat as "do not restart").
const EXIT_CONFIG: u8 = 64;
/// Exit code when the listener cannot be bound or the proxy cannot start.
const EXIT_UNAVAILABLE: u8 = 69;

#[derive(Debug, Parser)]
#[command(version, about = "Rate-limiting reverse proxy for the TMDB API")]
struct Args {
    /// Path of the TOML configuration file.
    #[arg(long, short, global = true, default_value = "config/tmdb-proxy.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate the configuration (file plus environment) and print it, keys redacted.
    Check,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let cfg = match Config::load(&args.config) {
        Ok(cfg) => cfg,
        Err(error) => {
            eprintln!("tmdb-proxy: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // The listener's TLS files are read here, before anything binds: a bad certificate is a
    // configuration error like any other.
    let frontend = match Server::new(&cfg.server) {
        Ok(frontend) => frontend,
        Err(error) => {
            eprintln!("tmdb-proxy: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Some(Command::Check) = args.command {
        eprintln!("tmdb-proxy: {} is valid", args.config.display());
        eprintln!("{cfg:#?}");
        check_redis(&cfg);
        return ExitCode::SUCCESS;
    }
    telemetry::init(&cfg.log.level, cfg.log.level_from, cfg.log.format);
    check_open_files(&cfg);
    // This thread serves clients too, beside `server.workers - 1` more (`server::workers`).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("tmdb-proxy: cannot start the runtime: {error}");
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
    };
    runtime.block_on(serve(args.config, cfg, frontend))
}

async fn serve(path: PathBuf, cfg: Config, frontend: Server) -> ExitCode {
    let proxy = match Proxy::new(&cfg) {
        Ok(proxy) => proxy,
        Err(error) => {
            tracing::error!(%error, "cannot build the proxy");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let listener = match server::bind(cfg.server.listen) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(listen = %cfg.server.listen, %error, "cannot bind the listener");
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
    };
    // The proxy's job is forwarding: an admin port already taken (9090 is also Prometheus's
    // default) is reported loudly but does not stop it. Probes then fail, which is visible.
    let admin_listener = match tokio::net::TcpListener::bind(cfg.admin.listen).await {
        Ok(listener) => Some(listener),
        Err(error) => {
            tracing::error!(
                listen = %cfg.admin.listen,
                %error,
                "cannot bind the admin listener; serving without /healthz, /readyz and /metrics"
            );
            None
        }
    };
    let bound = |l: Option<&tokio::net::TcpListener>| {
        l.and_then(|l| l.local_addr().ok())
            .map_or_else(|| "-".to_owned(), |a| a.to_string())
    };
    // Before the line that says it listens: a SIGTERM from then on drains, it does not kill.
    let stop = server::shutdown::signal();
    tracing::info!(
        listen = %bound(Some(&listener)),
        admin = %bound(admin_listener.as_ref()),
        upstream = %cfg.upstream.base_url,
        requests_per_second = cfg.limit.requests_per_second.get(),
        mode = ?cfg.limit.mode,
        "tmdb-proxy listening"
    );
    // The admin listener outlives the client listener, so /readyz can report the drain.
    let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    let admin = admin_listener.map(|admin_listener| {
        let admin_cfg = cfg.server.clone();
        let proxy = proxy.clone();
        tokio::spawn(async move {
            admin::run(admin_listener, proxy, &admin_cfg, async {
                let _ = admin_stopped.await;
            })
            .await;
        })
    });
    let reloader = tokio::spawn(server::reload::watch(path, proxy.clone(), cfg.clone()));
    frontend.run(listener, proxy, stop).await;
    reloader.abort();
    let _ = admin_stop.send(());
    if let Some(admin) = admin {
        let _ = admin.await;
    }
    tracing::info!("tmdb-proxy stopped");
    ExitCode::SUCCESS
}

/// With `[cluster]` on, reports whether Redis answers, accepts the credentials and runs the
/// budget script. A Redis that does not answer is a warning, not an error: the proxy then
/// serves on its local share.
fn check_redis(cfg: &Config) {
    let Some(store) = &cfg.cluster.store else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let Ok(runtime) = runtime else {
        eprintln!("tmdb-proxy: cannot start a runtime to check Redis");
        return;
    };
    let within = std::time::Duration::from_secs(3);
    match runtime.block_on(tmdb_proxy::limiter::shared::check(
        &cfg.cluster,
        store,
        within,
    )) {
        Ok(()) => eprintln!(
            "tmdb-proxy: Redis ({store:?}) answered, accepted the credentials and runs the budget script"
        ),
        Err(error) => eprintln!(
            "tmdb-proxy: warning: Redis ({store:?}) cannot be used now ({error}); the proxy would serve on its local share"
        ),
    }
}

/// Raises the open-files limit to its hard maximum, and warns if the configured connection caps
/// can still run it out (accepts would then fail for every listener).
fn check_open_files(cfg: &Config) {
    let connections = u64::from(cfg.server.max_connections.get())
        + u64::from(cfg.upstream.max_connections.get())
        + admin::MAX_ADMIN_CONNECTIONS as u64;
    let needed = server::fds::needed(connections, u64::from(cfg.server.workers.get()));
    match server::fds::raise_limit() {
        Some(limit) if limit < needed => tracing::warn!(
            limit,
            needed,
            "the open-files limit is below what server.max_connections may need; raise it \
             (LimitNOFILE=, ulimit -n) or lower server.max_connections"
        ),
        Some(limit) => tracing::debug!(limit, needed, "open-files limit"),
        None => {}
    }
}
