//! Starting the server, one way for `hpcforge serve` and the tests alike:
//! [`Server::build`] opens the configured store (or [`Server::build_on`] takes one),
//! loads the server key, seeds the examples, builds the state and binds the
//! listener; [`Server::run`] starts the mediator and serves until a shutdown future
//! resolves, then lets submissions under way record their job IDs. Tests bind
//! `127.0.0.1:0` and pass their own shutdown signal.

use std::future::Future;
use std::net::SocketAddr;
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

/// Refuses a server key that opens none of the SSH keys the store holds (up to three
/// tried): a replica given another key than the others, or a key file lost and made
/// anew, would otherwise fail every task of those users. Unchecked while the store
/// does not answer.
async fn check_key_opens_credentials(
    store: &dyn Store,
    key: &crate::secrets::ServerKey,
    path: &std::path::Path,
) -> anyhow::Result<()> {
    let Ok(infos) = store.list_credentials(None).await else { return Ok(()) };
    let mut tried = 0;
    for info in infos.iter().take(3) {
        let Ok(Some(stored)) = store.get_credential(&info.user, &info.cluster).await else { continue };
        tried += 1;
        let purpose = crate::secrets::credential_purpose(info.user.as_str(), info.cluster.as_str());
        if key.open(&purpose, &stored.sealed).is_ok() {
            return Ok(());
        }
    }
    anyhow::ensure!(
        tried == 0,
        "the server key {} opens none of the SSH keys stored in this store ({tried} tried): they were sealed with \
         another key. Every server of one store needs the same key file: copy it from a running replica, or restore \
         it from its backup",
        path.display()
    );
    Ok(())
}

/// A server ready to run: store open, state built, listener bound.
pub struct Server {
    listener: TcpListener,
    state: AppState,
    stop: tokio::sync::watch::Sender<bool>,
    max_body_bytes: usize,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("addr", &self.listener.local_addr().ok()).finish_non_exhaustive()
    }
}

impl Server {
    /// Opens the store `config` names and builds the server on it.
    pub async fn build(config: &ServeConfig) -> anyhow::Result<Self> {
        let store = open_store(&config.storage).await?;
        Self::build_on(config, store).await
    }

    /// Builds the server on `store`: binds `config.listen`, loads (or creates) the
    /// server key, seeds an empty store with the examples if asked to.
    pub async fn build_on(config: &ServeConfig, store: Arc<dyn Store>) -> anyhow::Result<Self> {
        // One server per embedded store: refused before anything else is touched.
        store.claim_for_server()?;
        // Try the store once so a misconfiguration shows at start; serve anyway, since
        // `/readyz` reports it and the store may come up later.
        if let Err(e) = store.ping().await {
            tracing::warn!(error = format!("{e:#}"), "the store is not reachable yet; /readyz answers 503 until it is");
        }
        let listener =
            TcpListener::bind(config.listen).await.with_context(|| format!("listening on {}", config.listen))?;
        let (key, created) = crate::secrets::ServerKey::load_or_create(&config.secret_key_file)?;
        if created {
            tracing::warn!(
                path = %config.secret_key_file.display(),
                "created a new server key: it seals the SSH keys users register; back it up (without it they cannot be used)"
            );
        }
        check_key_opens_credentials(store.as_ref(), &key, &config.secret_key_file).await?;
        if config.seed_examples {
            match crate::examples::seed_if_empty(store.as_ref()).await {
                Ok(added) if !added.is_empty() => {
                    tracing::info!(added = added.join(", "), "seeded an empty store with the examples")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = format!("{e:#}"), "could not seed the examples"),
            }
        }
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let state = AppState::new(store, config.limits, Arc::new(key), config.mediator.clone(), config.rate, stop_rx);
        // Take this server's place among the replicas sharing the store.
        state.mediator.join().await?;
        Ok(Self { listener, state, stop, max_body_bytes: config.max_body_bytes })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    /// Its state (store, mediator, ...), for whoever runs it to keep a handle on.
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Starts the mediator and serves until `shutdown` resolves; then event streams
    /// and the mediator's loops stop, requests in flight finish, and submissions under
    /// way get up to 30 s to record their job IDs.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        self.run_with(|router| router, shutdown).await
    }

    /// [`Self::run`], with the router wrapped by `wrap` first (tests add a layer that
    /// checks every answer against the OpenAPI document).
    pub async fn run_with(
        self,
        wrap: impl FnOnce(axum::Router) -> axum::Router,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Self { listener, state, stop, max_body_bytes } = self;
        state.mediator.start(state.shutdown.clone());
        let mediator = state.mediator.clone();
        let app = wrap(api::router(state, max_body_bytes));
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                shutdown.await;
                // Event streams and the mediator's loops stop taking new work now.
                let _ = stop.send(true);
            })
            .await
            .context("serving HTTP")?;
        // HTTP is done; let submissions already under way record their job IDs, and
        // hand the claims of those that do not end in time back to the other replicas.
        mediator.stop_work().await;
        Ok(())
    }
}

/// `hpcforge serve`: build, serve until Ctrl-C or SIGTERM.
pub async fn serve(config: ServeConfig) -> anyhow::Result<()> {
    let server = Server::build(&config).await?;
    let addr = server.addr();
    let backend = server.state().store.backend();
    match server.state().store.list_accounts().await {
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
    server.run(shutdown_signal()).await?;
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
