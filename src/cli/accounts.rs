//! `hpcforge user ...`, `hpcforge token ...` and `hpcforge whoami`.
//!
//! With a token these talk to the server like every other command. Without one,
//! `user add` and `token create` open the store directly (the same store options as
//! `serve`): that is how the first admin is made, and how an admin who lost every
//! token gets a new one. Whoever can read the store's files or its MongoDB URI is an
//! admin already, so this opens nothing new.
//!
//! A new token is printed alone on standard output (so `TOKEN=$(hpcforge user add
//! ...)` works) and explained on standard error.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::json;

use super::output::{done, when};
use super::{ServerArgs, StoreArgs, client};
use crate::api::users::{AddedUser, Me, UserDetail};
use crate::auth::{IssuedToken, Role, TokenInfo, UserAccount};
use crate::model::UserName;

/// `hpcforge user ...`
#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Add an account and print its first token. Without HPCFORGE_TOKEN this opens the
    /// store directly, which is how the first admin is made.
    Add {
        /// The name: for users and admins, the Unix user their tasks run as.
        name: String,
        /// admin, user or portal.
        #[arg(long, default_value = "user")]
        role: Role,
        #[command(flatten)]
        token: NewTokenArgs,
        #[command(flatten)]
        server: ServerArgs,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List accounts (admin).
    List {
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Show an account and its tokens.
    Show {
        /// The account.
        name: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Disable an account and revoke its tokens (admin). Its tasks stay.
    Disable {
        /// The account.
        name: String,
        #[command(flatten)]
        server: ServerArgs,
    },
}

/// What a new token is for and how long it lives.
#[derive(Debug, Args)]
pub struct NewTokenArgs {
    /// A label for the token (`laptop`, `portal-prod`).
    #[arg(long, default_value = "")]
    label: String,
    /// How long the token lives, in days.
    #[arg(long, default_value_t = crate::auth::DEFAULT_TOKEN_DAYS)]
    expires_in_days: u32,
}

/// `hpcforge token ...`
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a token and print it (for yourself, or for --user as an admin). Without
    /// HPCFORGE_TOKEN this opens the store directly (for an admin who lost theirs).
    Create {
        /// Whose token [default: yours].
        #[arg(long)]
        user: Option<String>,
        #[command(flatten)]
        token: NewTokenArgs,
        #[command(flatten)]
        server: ServerArgs,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List tokens (yours, or --user's as an admin).
    List {
        /// Whose tokens [default: yours].
        #[arg(long)]
        user: Option<String>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Revoke a token.
    Revoke {
        /// The token's ID (from `token list`).
        id: String,
        /// Whose token [default: yours].
        #[arg(long)]
        user: Option<String>,
        #[command(flatten)]
        server: ServerArgs,
    },
}

/// Prints a new token: the token on stdout, what it is on stderr.
fn print_token(token: &IssuedToken) {
    println!("{}", token.token);
    eprintln!(
        "token {} for `{}`, expires {}; it is shown only now. Use it with:\n  export HPCFORGE_TOKEN=<the token above>",
        token.info.id,
        token.info.user,
        when(token.info.expires_at)
    );
}

/// Who runs the command, as recorded for what the store-direct commands create.
fn local_admin() -> UserName {
    crate::mediator::current_user().unwrap_or_else(|| UserName::parse("hpcforge").expect("valid name"))
}

async fn open_store(store: &StoreArgs) -> anyhow::Result<std::sync::Arc<dyn crate::store::Store>> {
    let config = store.resolve()?;
    let s = crate::server::open_store(&config.storage).await?;
    s.ping().await.map_err(|e| anyhow::anyhow!("the store does not answer: {e}"))?;
    Ok(s)
}

fn issue_failed(e: crate::auth::IssueError) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::FAILURE
}

/// Runs `hpcforge user ...`.
pub async fn user_command(cmd: UserCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        UserCommand::Add { name, role, token: NewTokenArgs { label, expires_in_days }, server, store } => {
            let name = UserName::parse(&name)?;
            if server.token()?.is_none() {
                let s = open_store(&store).await?;
                return Ok(
                    match crate::auth::add_user(
                        s.as_ref(),
                        &name,
                        role,
                        &label,
                        Some(expires_in_days),
                        &local_admin(),
                        time::OffsetDateTime::now_utc(),
                    )
                    .await
                    {
                        Ok((user, token)) => {
                            eprintln!(
                                "user `{}` added ({}), directly in the {} store",
                                user.name,
                                user.role,
                                s.backend()
                            );
                            print_token(&token);
                            ExitCode::SUCCESS
                        }
                        Err(e) => issue_failed(e),
                    },
                );
            }
            let c = client(&server)?;
            let body = json!({ "name": name, "role": role, "label": label, "expires_in_days": expires_in_days });
            match c.call::<AddedUser>(Method::POST, "/api/v1/users", Some(&body)).await {
                Ok(a) => {
                    eprintln!("{}", a.message);
                    print_token(&a.data.token);
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => Err(e.into()),
            }
        }
        UserCommand::List { server } => {
            let c = client(&server)?;
            match c.call::<Vec<UserAccount>>(Method::GET, "/api/v1/users", None::<&()>).await {
                Ok(a) => {
                    for u in a.data {
                        let state = match u.disabled_at {
                            Some(t) => format!("disabled {}", when(t)),
                            None => "active".to_owned(),
                        };
                        println!(
                            "{:<20} {:<7} {:<28} added by {} {}",
                            u.name,
                            u.role,
                            state,
                            u.created_by,
                            when(u.created_at)
                        );
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => Err(e.into()),
            }
        }
        UserCommand::Show { name, server } => {
            let c = client(&server)?;
            match c.call::<UserDetail>(Method::GET, &format!("/api/v1/users/{name}"), None::<&()>).await {
                Ok(a) => {
                    println!("{}", a.message);
                    print_tokens(&a.data.tokens);
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => Err(e.into()),
            }
        }
        UserCommand::Disable { name, server } => {
            let c = client(&server)?;
            Ok(done(c.call::<UserAccount>(Method::DELETE, &format!("/api/v1/users/{name}"), None::<&()>).await?))
        }
    }
}

fn print_tokens(tokens: &[TokenInfo]) {
    let now = time::OffsetDateTime::now_utc();
    for t in tokens {
        let state = match (t.revoked_at, t.expires_at <= now) {
            (Some(at), _) => format!("revoked {}", when(at)),
            (None, true) => "expired".to_owned(),
            (None, false) => format!("valid until {}", when(t.expires_at)),
        };
        let used = t.last_used_at.map_or("never used".to_owned(), |u| format!("last used {}", when(u)));
        println!("  {}  {:<10} {:<40} {}  {}", t.id, t.hint, state, used, t.label);
    }
}

/// `user` if given, else the caller's own name, asked of the server.
async fn whose(c: &super::client::Client, user: Option<String>) -> Result<String, super::client::ClientError> {
    match user {
        Some(u) => Ok(u),
        None => c.call::<Me>(Method::GET, "/api/v1/me", None::<&()>).await.map(|a| a.data.user.to_string()),
    }
}

/// Runs `hpcforge token ...`.
pub async fn token_command(cmd: TokenCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        TokenCommand::Create { user, token: NewTokenArgs { label, expires_in_days }, server, store } => {
            if server.token()?.is_none() {
                let Some(user) = user else {
                    anyhow::bail!("without HPCFORGE_TOKEN, say whose token to make with --user NAME");
                };
                let user = UserName::parse(&user)?;
                let s = open_store(&store).await?;
                return Ok(
                    match crate::auth::issue_token(
                        s.as_ref(),
                        &user,
                        &label,
                        Some(expires_in_days),
                        &local_admin(),
                        time::OffsetDateTime::now_utc(),
                    )
                    .await
                    {
                        Ok(token) => {
                            print_token(&token);
                            ExitCode::SUCCESS
                        }
                        Err(e) => issue_failed(e),
                    },
                );
            }
            let c = client(&server)?;
            let user = whose(&c, user).await?;
            let body = json!({ "label": label, "expires_in_days": expires_in_days });
            match c.call::<IssuedToken>(Method::POST, &format!("/api/v1/users/{user}/tokens"), Some(&body)).await {
                Ok(a) => {
                    print_token(&a.data);
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => Err(e.into()),
            }
        }
        TokenCommand::List { user, server } => {
            let c = client(&server)?;
            let user = whose(&c, user).await?;
            match c.call::<UserDetail>(Method::GET, &format!("/api/v1/users/{user}"), None::<&()>).await {
                Ok(a) => {
                    print_tokens(&a.data.tokens);
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => Err(e.into()),
            }
        }
        TokenCommand::Revoke { id, user, server } => {
            let c = client(&server)?;
            let user = whose(&c, user).await?;
            Ok(done(
                c.call::<TokenInfo>(Method::DELETE, &format!("/api/v1/users/{user}/tokens/{id}"), None::<&()>).await?,
            ))
        }
    }
}

/// Runs `hpcforge whoami`.
pub async fn whoami(server: &ServerArgs) -> anyhow::Result<ExitCode> {
    let c = client(server)?;
    match c.call::<Me>(Method::GET, "/api/v1/me", None::<&()>).await {
        Ok(a) => {
            println!("{} (token {}, expires {})", a.message, a.data.token, when(a.data.token_expires_at));
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Err(e.into()),
    }
}
