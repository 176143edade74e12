//! Starting the server: open the configured store, build the router, serve on a
//! listener until a shutdown future resolves. Tests call [`run`] with a listener on
//! `127.0.0.1:0` and their own shutdown signal.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;

use crate::api::{self, AppState};
use crate::config::{ServeConfig, StorageConfig};
use crate::store::Store;
use crate::store::embedded::EmbeddedStore;
use crate::store::mongo::MongoStore;

/// Opens the store `storage` describes. MongoDB is not contacted yet (see
/// [`MongoStore::connect`]); the embedded store is opened and its schema created.
pub async fn open_store(storage: &StorageConfig) -> anyhow::Result<Arc<dyn Store>> {
    Ok(match storage {
        StorageConfig::Embedded { data_dir } => {
            let store = EmbeddedStore::open(data_dir)?;
            tracing::info!(path = %store.path().display(), "using the embedded store");
            Arc::new(store)
        }
        StorageConfig::Mongo { uri, database, transactions } => {
            let store = MongoStore::connect(uri.expose(), database, *transactions).await?;
            tracing::info!(database = store.database().name(), "using the MongoDB store");
            Arc::new(store)
        }
    })
}

/// Serves the API on `listener` until `shutdown` resolves, then finishes in-flight
/// requests and returns.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    max_body_bytes: usize,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    run_router(listener, api::router(state, max_body_bytes), shutdown).await
}

/// Serves `app` on `listener` until `shutdown` resolves (tests wrap the router with
/// extra layers first).
pub async fn run_router(
    listener: TcpListener,
    app: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await.context("serving HTTP")
}

/// `hpcforge serve`: bind, open the store, serve until Ctrl-C or SIGTERM.
pub async fn serve(config: ServeConfig) -> anyhow::Result<()> {
    let store = open_store(&config.storage).await?;
    // Try the store once so a misconfiguration shows at start; serve anyway, since
    // `/readyz` reports it and the store may come up later.
    if let Err(e) = store.ping().await {
        tracing::warn!(error = format!("{e:#}"), "the store is not reachable yet; /readyz answers 503 until it is");
    }
    let listener = TcpListener::bind(config.listen).await.with_context(|| format!("listening on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let (key, created) = crate::secrets::ServerKey::load_or_create(&config.secret_key_file)?;
    if created {
        tracing::warn!(
            path = %config.secret_key_file.display(),
            "created a new server key: it seals the SSH keys users register; back it up (without it they cannot be used)"
        );
    }
    if config.seed_examples {
        match crate::examples::seed_if_empty(store.as_ref()).await {
            Ok(added) if !added.is_empty() => {
                tracing::info!(added = added.join(", "), "seeded an empty store with the examples")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = format!("{e:#}"), "could not seed the examples"),
        }
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let state = AppState::new(
        store,
        config.limits,
        std::sync::Arc::new(key),
        config.mediator.clone(),
        config.rate,
        stop_rx.clone(),
    );
    let backend = state.store.backend();
    state.mediator.start(stop_rx);
    match state.store.list_accounts().await {
        Ok(a) if a.is_empty() => tracing::warn!(
            "no user accounts yet: make the first admin with `hpcforge user add <name> --role admin` (it prints a token)"
        ),
        _ => {}
    }
    if !addr.ip().is_loopback() {
        tracing::warn!(
            %addr,
            "listening beyond loopback over plain HTTP: tokens cross the network in the clear unless a proxy terminates TLS in front"
        );
    }
    // Logged last: once this line is out, the server is ready.
    tracing::info!(%addr, store = backend, "hpcforge listening on http://{addr}");
    let mediator = state.mediator.clone();
    run(listener, state, config.max_body_bytes, async move {
        shutdown_signal().await;
        // Event streams and the mediator's loops stop taking new work now.
        let _ = stop_tx.send(true);
    })
    .await?;
    // HTTP is done; let submissions already under way record their job IDs.
    let busy = mediator.submissions_in_flight();
    if busy > 0 {
        tracing::info!(submissions = busy, "waiting for submissions under way to finish");
    }
    let left = mediator.drain(DRAIN_LIMIT).await;
    if left > 0 {
        tracing::warn!(
            submissions = left,
            "stopped with submissions still under way; the next start finds their jobs by tag"
        );
    }
    tracing::info!("stopped");
    Ok(())
}

/// How long a shutdown waits for submissions under way.
const DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down: finishing requests in flight");
}
