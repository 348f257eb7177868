//! Typed ids and states, one spelling everywhere: each state derives serde and
//! `sqlx::Type` with the same snake_case names, so the database, the wire and the code
//! cannot disagree, and nothing compares a state as a string.

use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgArgumentBuffer, PgTypeInfo, PgValueRef};
use sqlx::{Decode, Encode, Postgres, Type};

/// A patch number as the tracker gives it: u64 in the code and on the wire, BIGINT in the
/// store. The record reader accepts at most 2^53 (what JSON numbers carry exactly), so
/// every id fits; a value that does not is refused at the store, never truncated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PatchId(pub u64);

impl std::fmt::Display for PatchId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl From<u64> for PatchId {
    fn from(v: u64) -> Self {
        PatchId(v)
    }
}

impl Type<Postgres> for PatchId {
    fn type_info() -> PgTypeInfo {
        <i64 as Type<Postgres>>::type_info()
    }
}

impl Encode<'_, Postgres> for PatchId {
    fn encode_by_ref(
        &self,
        buf: &mut PgArgumentBuffer,
    ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        let v = i64::try_from(self.0).map_err(|_| format!("patch id {} exceeds BIGINT", self.0))?;
        <i64 as Encode<Postgres>>::encode_by_ref(&v, buf)
    }
}

impl Decode<'_, Postgres> for PatchId {
    fn decode(value: PgValueRef<'_>) -> Result<Self, sqlx::error::BoxDynError> {
        let v = <i64 as Decode<Postgres>>::decode(value)?;
        Ok(PatchId(u64::try_from(v).map_err(|_| {
            format!("negative patch id {v} in the store")
        })?))
    }
}

/// A package format: the two families of the platforms Certo knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PackageFormat {
    Rpm,
    Deb,
}

impl PackageFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            PackageFormat::Rpm => "rpm",
            PackageFormat::Deb => "deb",
        }
    }

    /// How people call the family: `RPM`, `Debian`.
    pub fn family_name(self) -> &'static str {
        match self {
            PackageFormat::Rpm => "RPM",
            PackageFormat::Deb => "Debian",
        }
    }

    pub fn with_article(self) -> &'static str {
        match self {
            PackageFormat::Rpm => "an RPM",
            PackageFormat::Deb => "a Debian",
        }
    }
}

impl std::fmt::Display for PackageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Declares a state enum with one snake_case spelling for serde, sqlx and `as_str`.
macro_rules! state_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Type)]
        #[serde(rename_all = "snake_case")]
        #[sqlx(type_name = "text", rename_all = "snake_case")]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The one spelling of this value (database, wire, output).
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                $name::ALL
                    .iter()
                    .copied()
                    .find(|v| v.as_str() == s)
                    .ok_or_else(|| format!(
                        "{s:?} is not a {} (expected one of: {})",
                        stringify!($name),
                        $name::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>().join(", ")
                    ))
            }
        }
    };
}

state_enum! {
    /// A VM run as the orchestrator records it (`vms.state`).
    VmState {
        /// Boot requested; the harness has not joined yet.
        Booting = "booting",
        /// The harness joined the testbed; tests are running.
        Joined = "joined",
        /// The harness reported its tests done.
        Done = "done",
        /// The harness reported an error of its own.
        Failed = "failed",
        /// The deadline passed.
        TimedOut = "timed_out",
        /// The guest ended without reporting (panic, power-off).
        Crashed = "crashed",
        /// The host stopped answering about the VM.
        Lost = "lost",
    }
}

impl VmState {
    /// Whether the run is still going (neither reported nor ended).
    pub fn is_live(self) -> bool {
        matches!(self, VmState::Booting | VmState::Joined)
    }
}

/// A VM as its host agent sees the domain (the agent protocol's own type).
pub use certo_proto::agent::HostVmState;

state_enum! {
    /// Which test suites a VM runs.
    Suite {
        Basic = "basic",
        Regression = "regression",
        All = "all",
    }
}

impl Suite {
    /// Whether this selection includes the basic suite.
    pub fn has_basic(self) -> bool {
        matches!(self, Suite::Basic | Suite::All)
    }
    /// Whether this selection includes the regression suite.
    pub fn has_regression(self) -> bool {
        matches!(self, Suite::Regression | Suite::All)
    }
}

state_enum! {
    /// One test's result as the guest harness reports it.
    TestStatus {
        Pass = "pass",
        Fail = "fail",
        Error = "error",
    }
}

state_enum! {
    /// A testbed service a guest reports.
    ServiceStatus {
        Up = "up",
        Failed = "failed",
    }
}

state_enum! {
    /// Whose fault an unsuccessful end is: retrying helps only for the infrastructure's.
    Fault {
        /// The product: the guest reported a failure, a test failed, the patch's code hung
        /// or crashed the VM after it joined.
        Product = "product",
        /// The infrastructure: the host could not boot the VM, its agent went silent, the
        /// guest never joined the testbed.
        Infrastructure = "infrastructure",
    }
}

state_enum! {
    /// A certification run (the workflow engine's unit).
    RunState {
        Queued = "queued",
        Running = "running",
        Succeeded = "succeeded",
        Failed = "failed",
        Cancelled = "cancelled",
    }
}

state_enum! {
    /// One step of a run.
    StepState {
        Pending = "pending",
        Runnable = "runnable",
        Claimed = "claimed",
        Succeeded = "succeeded",
        Failed = "failed",
        Skipped = "skipped",
        Cancelled = "cancelled",
    }
}

state_enum! {
    /// What certification decides for a patch.
    Verdict {
        Certified = "certified",
        Rejected = "rejected",
    }
}

state_enum! {
    /// Where a rejected patch failed.
    RejectionStage {
        Plan = "plan",
        ImageBuild = "image_build",
        Transfer = "transfer",
        Boot = "boot",
        Join = "join",
        BasicTests = "basic_tests",
        RegressionTests = "regression_tests",
        BugChecks = "bug_checks",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_and_text_agree_for_every_state() {
        fn check<T>(all: &[T])
        where
            T: Copy
                + Serialize
                + std::fmt::Display
                + std::str::FromStr
                + PartialEq
                + std::fmt::Debug,
            <T as std::str::FromStr>::Err: std::fmt::Debug,
        {
            for v in all {
                let json = serde_json::to_string(v).expect("serialise");
                assert_eq!(json, format!("\"{v}\""));
                assert_eq!(v.to_string().parse::<T>().expect("parse"), *v);
            }
        }
        check(VmState::ALL);
        check(Suite::ALL);
        check(TestStatus::ALL);
        check(ServiceStatus::ALL);
        check(Fault::ALL);
        check(RunState::ALL);
        check(StepState::ALL);
        check(Verdict::ALL);
        check(RejectionStage::ALL);
        assert!("Joined".parse::<VmState>().is_err());
        assert_eq!(VmState::TimedOut.as_str(), "timed_out");
    }

    #[test]
    fn patch_ids_keep_all_64_bits_on_the_wire() {
        let id = PatchId(u64::from(u32::MAX) + 7);
        assert_eq!(serde_json::to_string(&id).expect("json"), "4294967302");
    }
}
