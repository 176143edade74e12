//! `hpcforge app ...` and `hpcforge cluster ...`: push a definition folder (checked
//! first, problems shown per file), list, show, history, cat, delete.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::Value;

use super::output::{done, report, short, when};
use super::{ServerArgs, client};
use crate::definitions::folder::{self, LoadedFolder};
use crate::definitions::{Kind, UploadLimits};
use crate::store::Revision;

/// No extra push options (applications).
#[derive(Debug, Clone, Args)]
pub struct NoExtra {}

/// Extra push option of clusters.
#[derive(Debug, Clone, Args)]
pub struct TemplatesDir {
    /// Folder holding template sets (`<dir>/<set>/script_common`); by default the
    /// nearest `forge-templates/` above the cluster folder.
    #[arg(long)]
    pub templates_dir: Option<PathBuf>,
}

/// Commands on definitions.
#[derive(Debug, Subcommand)]
pub enum DefCommand<X: Args> {
    /// Read a definition folder, check it, and upload it as a new version.
    Push {
        /// The folder (`applications/<name>` or `clusters/<name>`).
        dir: PathBuf,
        /// Only check the folder; send nothing.
        #[arg(long)]
        check: bool,
        #[command(flatten)]
        extra: X,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// List current definitions.
    List {
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Show a definition (current version unless --version).
    Show {
        /// Name.
        name: String,
        /// Version to show.
        #[arg(long)]
        version: Option<u32>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// List every version of a definition.
    History {
        /// Name.
        name: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Print a stored file (`app_execute`, `forge/script_common`, ...).
    Cat {
        /// Name.
        name: String,
        /// File path within the definition.
        path: String,
        /// Version to read.
        #[arg(long)]
        version: Option<u32>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Delete a definition (old versions stay readable).
    Delete {
        /// Name.
        name: String,
        #[command(flatten)]
        server: ServerArgs,
    },
}

impl<S: serde::Serialize + Clone> LoadedFolder<S> {
    /// Re-types the folder's definition as JSON, so one push routine serves both kinds.
    pub fn map_spec(self) -> LoadedFolder<Value> {
        LoadedFolder {
            upload: crate::definitions::Upload {
                definition: serde_json::to_value(&self.upload.definition).expect("definitions serialise"),
                files: self.upload.files,
            },
            definition_file: self.definition_file,
            sources: self.sources,
            ignored: self.ignored,
        }
    }
}

pub async fn definitions<K: Kind, X: Args + Clone>(
    cmd: DefCommand<X>,
    load: impl FnOnce(&Path, &X, &UploadLimits) -> Result<LoadedFolder<Value>, folder::FolderProblems>,
) -> anyhow::Result<ExitCode> {
    let kind = K::KIND;
    let base = format!("/api/v1/{}", kind.plural());
    match cmd {
        DefCommand::Push { dir, check, extra, server } => {
            let loaded = match load(&dir, &extra, &UploadLimits::default()) {
                Ok(l) => l,
                Err(problems) => {
                    eprintln!("error: {} has problems; nothing was sent:", dir.display());
                    for p in &problems.0 {
                        eprintln!("  {p}");
                    }
                    return Ok(ExitCode::FAILURE);
                }
            };
            for ignored in &loaded.ignored {
                eprintln!("note: {} is not part of the {} format; not sent", ignored.display(), kind.singular());
            }
            let name = loaded.upload.definition.get("name").and_then(Value::as_str).unwrap_or_default().to_owned();
            if check {
                println!(
                    "{}: {} `{name}` is valid ({} files); nothing was sent",
                    dir.display(),
                    kind.singular(),
                    loaded.upload.files.len()
                );
                return Ok(ExitCode::SUCCESS);
            }
            let c = client(&server)?;
            let answer = c
                .call::<crate::api::definitions::Pushed>(Method::PUT, &format!("{base}/{name}"), Some(&loaded.upload))
                .await;
            match answer {
                Ok(a) => {
                    println!("{} (server {})", a.message, c.base());
                    for f in &a.data.revision.files {
                        println!("  {:<48} sha256 {}…  {} bytes", f.filename, short(&f.sha256), f.size);
                    }
                    for n in &a.data.notes {
                        println!("  note: {n}");
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => Ok(report(e, Some(&loaded))),
            }
        }
        DefCommand::List { server } => {
            let c = client(&server)?;
            match c.call::<Vec<Revision>>(Method::GET, &base, None::<&()>).await {
                Ok(a) => {
                    if a.data.is_empty() {
                        println!("no {} yet", kind.plural());
                    }
                    for r in a.data {
                        let label =
                            r.definition.as_ref().and_then(|d| d.get("label")).and_then(Value::as_str).unwrap_or("");
                        println!(
                            "{:<24} v{:<4} {:<12} {}  {label}",
                            r.name,
                            r.version,
                            r.uploaded_by,
                            when(r.uploaded_at)
                        );
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => Err(e.into()),
            }
        }
        DefCommand::Show { name, version, server } => {
            let c = client(&server)?;
            let path = match version {
                Some(v) => format!("{base}/{name}/versions/{v}"),
                None => format!("{base}/{name}"),
            };
            match c.call::<Value>(Method::GET, &path, None::<&()>).await {
                Ok(a) => {
                    println!("{}", serde_json::to_string_pretty(&a.data)?);
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => Err(e.into()),
            }
        }
        DefCommand::History { name, server } => {
            let c = client(&server)?;
            match c.call::<Vec<Revision>>(Method::GET, &format!("{base}/{name}/versions"), None::<&()>).await {
                Ok(a) => {
                    for r in a.data {
                        let what = if r.deleted { "deleted".to_owned() } else { format!("{} files", r.files.len()) };
                        println!("v{:<4} {:<12} {}  {what}", r.version, r.uploaded_by, when(r.uploaded_at));
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => Err(e.into()),
            }
        }
        DefCommand::Cat { name, path, version, server } => {
            let c = client(&server)?;
            let url = match version {
                Some(v) => format!("{base}/{name}/versions/{v}/files/{path}"),
                None => format!("{base}/{name}/files/{path}"),
            };
            match c.text(&url).await {
                Ok((text, _)) => {
                    print!("{text}");
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => Err(e.into()),
            }
        }
        DefCommand::Delete { name, server } => {
            let c = client(&server)?;
            Ok(done(c.call::<Revision>(Method::DELETE, &format!("{base}/{name}"), None::<&()>).await?))
        }
    }
}
