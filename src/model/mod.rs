//! The domain model: names that parse, applications, clusters, tasks, phases and
//! their graph (`workflow`), frame ranges (`frames`), what jobs post (`posts`), what they used (`usage`), the outputs kept in the store (`archive`), resources, and accounts with their tokens and credentials. Pure data and its checks; no I/O.

pub mod accounts;
pub mod application;
pub mod archive;
pub mod cluster;
pub mod files;
pub mod forged;
pub mod frames;
pub mod names;
pub mod posts;
pub mod problems;
pub mod queue;
pub mod resources;
pub mod rules;
pub mod task;
pub mod usage;
pub mod workflow;

pub use application::{ApplicationSpec, Choice, FileAction, FileEntry, FileMode, FileServer, InputSpec, InputType};
pub use cluster::{ClusterSpec, HostKey, Limits, SchedulerKind};
pub use names::{AppName, ClusterName, InputName, LicenceName, NameError, Phase, SiteId, TaskId, UserName};
pub use problems::{Problem, Problems};
pub use resources::{Memory, PhaseResources, Resources, SchedulerToken, WallTime};
pub use task::{
    DefinitionRef, Forged, ForgedScript, PastRun, PhaseRecord, PhaseState, StagedFile, StoredTaskScript, Task,
    TaskEvent, TaskState,
};
