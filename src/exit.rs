//! The process exit codes, one enum for the whole binary (README.md "Exit codes" is the same
//! table; a unit test keeps them equal). The sysexits names are in brackets.

use std::process::ExitCode;

use crate::agent::AgentError;
use crate::entitlement::EntitlementError;

/// Defines [`Exit`] and [`Exit::ALL`] from one list, so a new code cannot be left out of
/// `ALL` (and so out of the README test).
macro_rules! exit_codes {
    ($($(#[$doc:meta])* $name:ident = $code:literal,)*) => {
        /// Every code `meterd` exits with.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u8)]
        pub enum Exit {
            $($(#[$doc])* $name = $code,)*
        }

        impl Exit {
            /// Every variant, in declaration (code) order.
            pub const ALL: &'static [Exit] = &[$(Exit::$name),*];
        }
    };
}

exit_codes! {
    /// Stopped cleanly, or the command succeeded.
    Ok = 0,
    /// A command failed for a reason with no code of its own (a refused request, a failed
    /// check), or `run` was forced to stop (a second signal, or the grace period outlasted).
    Failure = 1,
    /// The command line is invalid: an unknown command, flag or value (clap's code).
    Usage = 2,
    /// The configuration is invalid, or a key file cannot be loaded (`EX_USAGE`).
    BadConfig = 64,
    /// The RegisterUsage token failed verification (`EX_DATAERR`).
    VerificationFailed = 65,
    /// The service refused for a reason that is neither entitlement nor configuration
    /// (`EX_UNAVAILABLE`).
    ServiceRefused = 69,
    /// The operating system's random source failed (`EX_SOFTWARE`).
    Internal = 70,
    /// A listener could not be bound (`EX_OSERR`).
    Listen = 71,
    /// The ledger could not be opened or used (`EX_IOERR`).
    Ledger = 74,
    /// Transient failures (throttling, 5xx, network) outlasted the start-up budget
    /// (`EX_TEMPFAIL`).
    TransientBudget = 75,
    /// The customer is not entitled to the product (`EX_NOPERM`).
    NotEntitled = 77,
    /// Platform, region, product code, key version, keyring, credentials or IAM permissions
    /// (`EX_CONFIG`).
    Configuration = 78,
}

impl Exit {
    /// The numeric code the process exits with.
    pub fn as_code(self) -> u8 {
        self as u8
    }
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> Self {
        ExitCode::from(exit.as_code())
    }
}

impl From<&EntitlementError> for Exit {
    fn from(e: &EntitlementError) -> Self {
        e.exit_code()
    }
}

impl From<&AgentError> for Exit {
    fn from(e: &AgentError) -> Self {
        e.exit_code()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `| code | meaning |` rows of README.md's "Exit codes" table.
    fn readme_codes() -> Vec<u8> {
        let readme = include_str!("../README.md");
        let table = readme
            .split("## Exit codes")
            .nth(1)
            .expect("README.md has an \"Exit codes\" section");
        table
            .lines()
            .skip_while(|l| !l.starts_with('|'))
            .take_while(|l| l.starts_with('|'))
            .filter_map(|l| l.split('|').nth(1))
            .filter_map(|cell| cell.trim().parse().ok())
            .collect()
    }

    #[test]
    fn codes_are_distinct_and_match_the_readme_table() {
        let codes: Vec<u8> = Exit::ALL.iter().map(|e| e.as_code()).collect();
        let distinct: std::collections::BTreeSet<_> = codes.iter().collect();
        assert_eq!(distinct.len(), codes.len(), "{codes:?}");
        assert_eq!(readme_codes(), codes);
    }

    #[test]
    fn sysexits_values_are_kept() {
        assert_eq!(Exit::BadConfig.as_code(), 64);
        assert_eq!(Exit::Listen.as_code(), 71);
        assert_eq!(Exit::Ledger.as_code(), 74);
        assert_eq!(ExitCode::from(Exit::Ok), ExitCode::SUCCESS);
        assert_eq!(ExitCode::from(Exit::Failure), ExitCode::FAILURE);
    }
}
