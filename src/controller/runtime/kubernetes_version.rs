//! The Kubernetes versions the controller runs on: the oldest supported release, how a server's
//! `/version` answer is read (managed clusters decorate it), and the check made once at start.
//!
//! Below [`OLDEST_SUPPORTED`] nothing has been tested (the suites run on that release and on the
//! newest; docs/development.md), so the controller refuses to start there with a message that
//! says why and how to override it, rather than failing later in a way nobody can place.

use k8s_openapi::apimachinery::pkg::version::Info;

/// The oldest Kubernetes minor release the operator supports and tests (`make test` runs the
/// CRD, chart, trust and controller suites on it). README "Kubernetes versions" says why.
pub const OLDEST_SUPPORTED: MinorVersion = MinorVersion {
    major: 1,
    minor: 32,
};

/// A Kubernetes release as major.minor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct MinorVersion {
    /// The major version (1).
    pub major: u32,
    /// The minor version.
    pub minor: u32,
}

impl std::fmt::Display for MinorVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// The release a `/version` answer names, or `None` when it names none we can read. `major` and
/// `minor` come first; managed clusters decorate them (`"32+"` on GKE and EKS), so only the
/// leading digits count. `gitVersion` (`v1.32.5-eks-1234`, the `v` optional) is the fallback
/// when they are empty.
pub fn minor_version(info: &Info) -> Option<MinorVersion> {
    let leading = |s: &str| -> Option<u32> {
        let digits: String = s.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    };
    if let (Some(major), Some(minor)) = (leading(&info.major), leading(&info.minor)) {
        return Some(MinorVersion { major, minor });
    }
    let git_version = &info.git_version;
    let mut parts = git_version
        .strip_prefix('v')
        .unwrap_or(git_version)
        .split('.');
    Some(MinorVersion {
        major: leading(parts.next()?)?,
        minor: leading(parts.next()?)?,
    })
}

/// Why the controller does not start on a server.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Unsupported {
    /// The server is older than [`OLDEST_SUPPORTED`].
    #[error(
        "the Kubernetes API server is {found} ({git_version}); xero-operator supports {oldest} and later \
         (older releases are untested and the chart's admission policies may be missing there). \
         Upgrade the cluster, or start with --allow-unsupported-kubernetes to run anyway"
    )]
    TooOld {
        /// The server's release.
        found: MinorVersion,
        /// Its full version string, as it reported it.
        git_version: String,
        /// The oldest supported release.
        oldest: MinorVersion,
    },
}

/// Whether a server answering `info` is in the supported range. A version that cannot be read
/// passes (the caller logs it): refusing a working cluster over an unusual version string would
/// be worse than running untested.
pub fn check(info: &Info, oldest: MinorVersion) -> Result<Option<MinorVersion>, Unsupported> {
    match minor_version(info) {
        Some(found) if found < oldest => Err(Unsupported::TooOld {
            found,
            // The server's own words, shown to a person: printable and bounded.
            git_version: crate::text::sanitize(&info.git_version, 64),
            oldest,
        }),
        found => Ok(found),
    }
}

/// Reads the server's `/version` (the outer error: it could not be read) and checks it against
/// `oldest` (the inner one says which release was found and what to do; a caller may choose
/// to run anyway). A version that cannot be parsed is logged and allowed.
pub async fn require_supported(
    client: &kube::Client,
    oldest: MinorVersion,
) -> anyhow::Result<Result<Info, Unsupported>> {
    let info = client
        .apiserver_version()
        .await
        .map_err(|e| anyhow::anyhow!("cannot read the Kubernetes API server's version: {e}"))?;
    let git_version = crate::text::sanitize(&info.git_version, 64);
    Ok(match check(&info, oldest) {
        Ok(Some(found)) => {
            tracing::info!(kubernetes = %found, %git_version, "Kubernetes API server");
            Ok(info)
        }
        Ok(None) => {
            tracing::warn!(
                %git_version,
                "cannot read the Kubernetes API server's version; running as if supported"
            );
            Ok(info)
        }
        Err(too_old) => Err(too_old),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(major: &str, minor: &str, git_version: &str) -> Info {
        Info {
            major: major.into(),
            minor: minor.into(),
            git_version: git_version.into(),
            ..Info::default()
        }
    }

    fn v(minor: u32) -> Option<MinorVersion> {
        Some(MinorVersion { major: 1, minor })
    }

    #[test]
    fn reads_plain_and_managed_cluster_versions() {
        assert_eq!(minor_version(&info("1", "32", "v1.32.13")), v(32));
        // GKE and EKS add a "+" to the minor and a suffix to gitVersion.
        assert_eq!(minor_version(&info("1", "33+", "v1.33.5-gke.1")), v(33));
        assert_eq!(
            minor_version(&info("1", "32+", "v1.32.9-eks-113cf36")),
            v(32)
        );
        // Empty major/minor (some distributions): gitVersion decides.
        assert_eq!(minor_version(&info("", "", "v1.31.4+k3s1")), v(31));
        assert_eq!(minor_version(&info("", "", "1.33.2")), v(33));
        assert_eq!(minor_version(&info("", "", "unknown")), None);
        assert_eq!(minor_version(&info("", "", "")), None);
    }

    #[test]
    fn refuses_only_releases_older_than_the_oldest_supported() {
        assert_eq!(
            check(&info("1", "32", "v1.32.0"), OLDEST_SUPPORTED),
            Ok(v(32))
        );
        assert_eq!(
            check(&info("1", "37", "v1.37.2"), OLDEST_SUPPORTED),
            Ok(v(37))
        );
        assert_eq!(
            check(&info("2", "0", "v2.0.0"), OLDEST_SUPPORTED),
            Ok(Some(MinorVersion { major: 2, minor: 0 }))
        );
        assert_eq!(check(&info("", "", "devel"), OLDEST_SUPPORTED), Ok(None));
        let err = check(&info("1", "31+", "v1.31.4-eks-1"), OLDEST_SUPPORTED).unwrap_err();
        assert_eq!(
            err,
            Unsupported::TooOld {
                found: MinorVersion {
                    major: 1,
                    minor: 31
                },
                git_version: "v1.31.4-eks-1".into(),
                oldest: OLDEST_SUPPORTED
            }
        );
        let message = err.to_string();
        assert!(message.contains("1.31 (v1.31.4-eks-1)"), "{message}");
        assert!(message.contains("supports 1.32 and later"), "{message}");
        assert!(
            message.contains("--allow-unsupported-kubernetes"),
            "{message}"
        );
    }
}
