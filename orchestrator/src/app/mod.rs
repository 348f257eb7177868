//! The application layer: a [`Context`] built from plain [`Settings`], and the operations
//! the CLI, the coming workers and the API all call. Operations report progress through
//! callbacks and return typed results; none of them prints.
//!
//! - [`patches`]: resolve a patch (a file, or a stored id and revision); expand a patch
//!   into its targets.
//! - [`images`]: build one image and record the result or the failure.
//! - [`vms`]: find the image a VM boots; run one VM (push, boot, wait, tear down) and
//!   record it.

pub mod certify;
pub mod evidence;
pub mod hooks;
pub mod hosts;
pub mod image_builds;
pub mod images;
pub mod patches;
pub mod reports;
pub mod runs;
pub mod show;
pub mod submit;
pub mod sweeps;
pub mod users;
pub mod vms;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use certo_imager::Imager;
use tokio::sync::OnceCell;

use crate::catalogue::{Catalogue, CatalogueError};
use crate::store::{Location, Store, StoreError};
use crate::world::WorldError;

/// Where Certo keeps its state and what it works from: filled by clap in the binary,
/// built directly by tests.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The data directory (embedded cluster, image cache, fixture world, index cache).
    pub data_dir: PathBuf,
    /// An existing PostgreSQL database; `None` for the embedded cluster.
    pub database_url: Option<String>,
    /// The catalogue file; `None` for the built-in fixture catalogue.
    pub catalogue: Option<PathBuf>,
    /// The package repository root; `None` for the fixture world under the data directory.
    pub repos: Option<PathBuf>,
}

impl Settings {
    /// Where the store is: the URL, or the embedded cluster under the data directory.
    pub fn location(&self) -> Location {
        match &self.database_url {
            Some(url) if !url.is_empty() => Location::Url(url.clone()),
            _ => Location::Embedded(self.data_dir.clone()),
        }
    }
}

/// What an operation could not do for reasons other than its input.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Catalogue(#[from] CatalogueError),
    #[error(transparent)]
    World(#[from] WorldError),
    #[error("opening the image cache: {0}")]
    Imager(certo_imager::BuildError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("a background task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// What the operation was asked about does not exist.
    #[error("{0}")]
    NotFound(String),
}

/// The application context: settings, the catalogue, and the store, the package
/// repositories and the imager, each opened on first use.
#[derive(Debug, Clone)]
pub struct Context {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    settings: Settings,
    catalogue: Catalogue,
    store: OnceCell<Store>,
    world: std::sync::OnceLock<PathBuf>,
    imager: std::sync::OnceLock<Imager>,
}

impl Context {
    /// A context over `settings`; reads the catalogue (nothing else is opened yet).
    pub fn new(settings: Settings) -> Result<Self, AppError> {
        let catalogue = match &settings.catalogue {
            Some(path) => Catalogue::from_file(path)?,
            None => Catalogue::builtin(),
        };
        Ok(Context {
            inner: Arc::new(Inner {
                settings,
                catalogue,
                store: OnceCell::new(),
                world: std::sync::OnceLock::new(),
                imager: std::sync::OnceLock::new(),
            }),
        })
    }

    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    pub fn data_dir(&self) -> &Path {
        &self.inner.settings.data_dir
    }

    pub fn catalogue(&self) -> &Catalogue {
        &self.inner.catalogue
    }

    /// The store, opened (and the embedded cluster started) on first use.
    pub async fn store(&self) -> Result<&Store, AppError> {
        Ok(self
            .inner
            .store
            .get_or_try_init(|| async {
                let location = self.inner.settings.location();
                Store::open(&location).await
            })
            .await?)
    }

    /// The package repository root: the settings' one, or the fixture world built under
    /// the data directory.
    pub fn world(&self) -> Result<PathBuf, AppError> {
        if let Some(repos) = &self.inner.settings.repos {
            return Ok(repos.clone());
        }
        if let Some(w) = self.inner.world.get() {
            return Ok(w.clone());
        }
        let data = self.data_dir();
        std::fs::create_dir_all(data).map_err(|source| AppError::Io {
            what: format!("creating {}", data.display()),
            source,
        })?;
        let dest = data.join("world");
        crate::world::build(&dest)?;
        Ok(self.inner.world.get_or_init(|| dest).clone())
    }

    /// Where the tokens of the hosts this orchestrator's workers call are kept, one file
    /// per host (mode 0600), written by `certo host add` and `certo up`.
    pub fn host_tokens_dir(&self) -> PathBuf {
        self.data_dir().join("host-tokens")
    }

    /// The token of host `name`, from [`Context::host_tokens_dir`].
    pub fn host_token(&self, name: &str) -> Result<String, AppError> {
        let valid = !name.is_empty()
            && name.len() <= 63
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            && !name.starts_with('.');
        let path = self.host_tokens_dir().join(name);
        if !valid {
            return Err(AppError::Io {
                what: format!("host name {name:?} cannot name a token file"),
                source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
            });
        }
        let text = std::fs::read_to_string(&path).map_err(|source| AppError::Io {
            what: format!("reading host {name}'s token from {}", path.display()),
            source,
        })?;
        Ok(text.lines().next().unwrap_or("").trim().to_owned())
    }

    /// Keeps host `name`'s token for the workers (mode 0600, replaced atomically).
    pub fn save_host_token(&self, name: &str, token: &str) -> Result<PathBuf, AppError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let dir = self.host_tokens_dir();
        let io = |what: String| move |source| AppError::Io { what, source };
        std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        let tmp = dir.join(format!(".{name}.tmp"));
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io(format!("creating {}", tmp.display())))?;
        writeln!(f, "{token}").map_err(io(format!("writing {}", tmp.display())))?;
        let path = dir.join(name);
        std::fs::rename(&tmp, &path).map_err(io(format!("renaming to {}", path.display())))?;
        Ok(path)
    }

    /// The imager over the data directory's cache and the package repositories.
    pub fn imager(&self) -> Result<Imager, AppError> {
        if let Some(i) = self.inner.imager.get() {
            return Ok(i.clone());
        }
        let world = self.world()?;
        let imager =
            Imager::open(&self.data_dir().join("imager"), &world).map_err(AppError::Imager)?;
        Ok(self.inner.imager.get_or_init(|| imager).clone())
    }
}

/// Why an operation did not do what was asked: the input was refused (it must change;
/// retrying will not help), what it names does not exist, the caller may not do it, or
/// Certo could not do its work.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Forbidden(String),
    #[error(transparent)]
    App(#[from] AppError),
}

impl From<StoreError> for OpError {
    fn from(e: StoreError) -> Self {
        OpError::App(AppError::Store(e))
    }
}

/// Which page of a list to give: `limit` items (1 to [`PageAsk::MAX`], default 50) after
/// skipping `offset`.
#[derive(Debug, Clone, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageAsk {
    /// Items per page (default 50; more than 1000 are taken as 1000).
    #[param(minimum = 1)]
    pub limit: Option<i64>,
    /// Items skipped from the start of the list.
    #[param(minimum = 0)]
    pub offset: Option<i64>,
    /// Continues after this item: a page's `next_after`. Unlike `offset`, it costs the
    /// same deep in a list as at its start, and a list that grows meanwhile neither
    /// repeats nor skips an item. Not combined with `offset`.
    pub after: Option<String>,
}

impl PageAsk {
    pub const MAX: i64 = 1000;
    pub const DEFAULT: i64 = 50;

    /// Everything, for the local CLI's lists (which have always shown everything).
    pub fn all() -> PageAsk {
        PageAsk {
            limit: Some(i64::MAX - 1),
            offset: None,
            after: None,
        }
    }

    /// `(limit, offset)` clamped to what a page may be.
    pub fn bounds(&self) -> (i64, i64) {
        (
            self.limit.unwrap_or(Self::DEFAULT).clamp(1, i64::MAX - 1),
            self.offset.unwrap_or(0).max(0),
        )
    }

    /// The API's page: a limit below 1 or a negative offset refused (saying which), a
    /// limit above [`PageAsk::MAX`] taken as the most a page holds.
    pub fn capped(self) -> Result<PageAsk, OpError> {
        if let Some(l) = self.limit.filter(|l| *l < 1) {
            return Err(OpError::Refused(format!(
                "limit={l}: a page holds 1 to {} items",
                Self::MAX
            )));
        }
        if let Some(o) = self.offset.filter(|o| *o < 0) {
            return Err(OpError::Refused(format!(
                "offset={o}: the items skipped are 0 or more"
            )));
        }
        let (limit, offset) = self.bounds();
        Ok(PageAsk {
            limit: Some(limit.min(Self::MAX)),
            offset: Some(offset),
            after: self.after,
        })
    }

    /// The `after` cursor as the keys `parse` reads from it (`None` without one); refused
    /// with `offset` beside it or when it is not one of this list's cursors.
    pub fn after_key<T>(
        &self,
        list: &str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Result<Option<T>, OpError> {
        let Some(a) = &self.after else {
            return Ok(None);
        };
        if self.offset.unwrap_or(0) > 0 {
            return Err(OpError::Refused(
                "`after` and `offset` cannot be combined: `after` already says where the page starts".into(),
            ));
        }
        parse(a).map(Some).ok_or_else(|| {
            OpError::Refused(format!(
                "after={a:?} is not a cursor of the {list} list (use a page's `next_after`)"
            ))
        })
    }
}

/// One page of a list: its items, how many there are in all, and where the next page
/// starts (`None` on the last).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Page {
    #[schema(value_type = Vec<Object>)]
    pub items: Vec<serde_json::Value>,
    pub total: i64,
    pub limit: i64,
    pub offset: i64,
    /// Where the next page starts by offset (`None` on the last page, and for a page
    /// asked for by `after`, whose position is not counted).
    pub next_offset: Option<i64>,
    /// The cursor of the next page (`after=`), `None` on the last page.
    pub next_after: Option<String>,
}

impl Page {
    pub fn new(items: Vec<serde_json::Value>, total: i64, limit: i64, offset: i64) -> Page {
        let end = offset.saturating_add(items.len() as i64);
        Page {
            next_offset: (end < total).then_some(end),
            next_after: None,
            items,
            total,
            limit,
            offset,
        }
    }

    /// A page of a list read one item past its end (`more`: that item existed), with the
    /// cursor of its last item for the next one. `keyset`: the page was asked for by
    /// `after` (its offset is unknown).
    pub fn keyed(
        items: Vec<serde_json::Value>,
        total: i64,
        limit: i64,
        offset: i64,
        more: bool,
        last_cursor: Option<String>,
        keyset: bool,
    ) -> Page {
        let end = offset.saturating_add(items.len() as i64);
        Page {
            next_offset: (more && !keyset).then_some(end),
            next_after: if more { last_cursor } else { None },
            items,
            total,
            limit,
            offset: if keyset { 0 } else { offset },
        }
    }
}

/// Who an operation acts for: the operator on the orchestrator's own machine (who holds
/// the store, so everything), or a user of the API with their role.
#[derive(Debug, Clone)]
pub enum Actor {
    Operator(String),
    User {
        name: String,
        role: crate::store::Role,
    },
}

impl Actor {
    /// The operator, named by `$USER`.
    pub fn operator() -> Actor {
        Actor::Operator(std::env::var("USER").unwrap_or_else(|_| "someone".into()))
    }

    pub fn name(&self) -> &str {
        match self {
            Actor::Operator(n) | Actor::User { name: n, .. } => n,
        }
    }

    pub fn is_admin(&self) -> bool {
        match self {
            Actor::Operator(_) => true,
            Actor::User { role, .. } => *role == crate::store::Role::Admin,
        }
    }

    /// Whether this actor may rerun or cancel `patch`: the operator and admins may act on
    /// every patch, a certifier on the patches they own.
    pub async fn may_act_on(&self, store: &Store, patch: u64) -> Result<(), OpError> {
        if self.is_admin() {
            return Ok(());
        }
        match store.patch_owner(patch).await? {
            Some(owner) if self.may_act_as_owner(Some(&owner)) => Ok(()),
            Some(owner) => Err(OpError::Forbidden(format!(
                "patch {patch} belongs to {owner}: only they or an admin may act on it"
            ))),
            None if store.get_patch(patch, None).await?.is_none() => {
                Err(OpError::NotFound(format!("patch {patch} is not stored")))
            }
            None => Err(OpError::Forbidden(format!(
                "patch {patch} was stored on the orchestrator's machine and has no owner: only an admin may act on it"
            ))),
        }
    }

    /// [`Actor::may_act_on`] of a stored patch whose owner is read already: an admin, or
    /// the owner.
    pub fn may_act_as_owner(&self, owner: Option<&str>) -> bool {
        self.is_admin() || owner.is_some_and(|o| o == self.name())
    }

    /// Refuses unless the actor is an admin (hosts, quarantine, sweeps, users).
    pub fn require_admin(&self, what: &str) -> Result<(), OpError> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(OpError::Forbidden(format!(
                "{what} is for admins; {} is a certifier",
                self.name()
            )))
        }
    }
}
