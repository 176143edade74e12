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
    let app = api::router(state, max_body_bytes);
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
    let state = AppState::new(store, config.limits, std::sync::Arc::new(key), config.mediator.clone());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let backend = state.store.backend();
    state.mediator.start(stop_rx);
    if !addr.ip().is_loopback() {
        tracing::warn!(
            %addr,
            "listening beyond loopback: this version has no authentication yet, so anyone who reaches this port can act as anyone"
        );
    }
    // Logged last: once this line is out, the server is ready.
    tracing::info!(%addr, store = backend, "hpcforge listening on http://{addr}");
    run(listener, state, config.max_body_bytes, async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    })
    .await?;
    tracing::info!("stopped");
    Ok(())
}

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
