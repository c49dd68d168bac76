//! What a seller's build fixes at compile time, so that the buyer, who controls the
//! configuration and the environment, cannot talk the agent out of its entitlement check.
//!
//! A build that bakes `METERD_PRODUCT_CODE` also bakes `METERD_PRICING` and `METERD_PLATFORM`
//! (`container` or `ami`); `build.rs` refuses to build one without the others. Such a binary:
//!
//! - refuses a configured product code or pricing other than the baked ones;
//! - trusts only the keyring baked from `keys/` (`registration.public_key_files` is refused);
//! - refuses a platform outside its family: a `container` build never takes the EC2 path
//!   (it never asks IMDS, so a fake metadata endpoint cannot make it skip RegisterUsage), an
//!   `ami` build always takes it;
//! - talks only to AWS: `aws.endpoint_url` must be an `https://…amazonaws.com` endpoint, and
//!   endpoint URLs from the environment or the shared config files are ignored, so no fake
//!   Metering Service can answer its DryRun or take its MeterUsage calls. A seller's own test
//!   build may bake `METERD_ENDPOINT_URL` (the emulator, say): that endpoint is then the one.
//!
//! Each refusal is exit 78 with a message naming the baked setting. An unbaked build
//! (development, the demo, tests) keeps every setting open.

use crate::config::{Config, PlatformSetting, Pricing};
use crate::platform::Platform;

/// The settings baked into this binary.
pub const BAKED: Baked = Baked {
    product_code: option_env!("METERD_PRODUCT_CODE"),
    pricing: option_env!("METERD_PRICING"),
    platform: option_env!("METERD_PLATFORM"),
    endpoint_url: option_env!("METERD_ENDPOINT_URL"),
};

/// The environment variables through which the AWS SDK would take another endpoint.
pub const ENDPOINT_ENV_VARS: [&str; 2] =
    ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_MARKETPLACE_METERING"];

/// The family of platforms a baked build runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlatformFamily {
    /// ECS, EKS or Fargate: RegisterUsage (or the container DryRun), never the EC2 path.
    Container,
    /// An AMI on EC2: the AMI's DryRun rules.
    Ami,
}

/// Compile-time settings; `None` (or empty) where nothing was baked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Baked {
    pub product_code: Option<&'static str>,
    pub pricing: Option<&'static str>,
    pub platform: Option<&'static str>,
    /// The endpoint a seller's test build talks to instead of AWS's regional one.
    pub endpoint_url: Option<&'static str>,
}

/// A configuration that asks a baked build to change what it was built for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "this binary was built with {setting}={baked:?}, and the configuration {detail}; fix: {fix}"
)]
pub struct LockedSetting {
    pub setting: &'static str,
    pub baked: String,
    pub detail: String,
    pub fix: String,
}

impl Baked {
    /// Whether this is a seller's locked-down build.
    pub fn is_locked(&self) -> bool {
        self.product_code.is_some_and(|c| !c.is_empty())
    }

    pub fn pricing(&self) -> Option<Pricing> {
        self.pricing.and_then(|p| p.parse().ok())
    }

    pub fn family(&self) -> Option<PlatformFamily> {
        match self.platform {
            Some("container") => Some(PlatformFamily::Container),
            Some("ami") => Some(PlatformFamily::Ami),
            _ => None,
        }
    }

    /// Every way `config` would change what this build was baked for; empty when unbaked.
    pub fn refusals(&self, config: &Config) -> Vec<LockedSetting> {
        let mut out = Vec::new();
        if !self.is_locked() {
            return out;
        }
        let locked =
            |setting: &'static str, baked: &str, detail: String, fix: String| LockedSetting {
                setting,
                baked: baked.to_owned(),
                detail,
                fix,
            };
        // The product code itself is checked by `check_product_code`, baked or not.
        if let Some(pricing) = self.pricing() {
            if pricing != config.pricing {
                out.push(locked(
                    "METERD_PRICING",
                    pricing.as_str(),
                    format!("sets pricing = {:?}", config.pricing.as_str()),
                    format!("set pricing = {:?}", pricing.as_str()),
                ));
            }
        }
        if !config.registration.public_key_files.is_empty() {
            out.push(locked(
                "METERD_PRODUCT_CODE",
                self.product_code.unwrap_or_default(),
                "adds registration.public_key_files; a locked build trusts only the keys baked from keys/".to_owned(),
                "remove registration.public_key_files (the seller adds keys to keys/ and rebuilds)".to_owned(),
            ));
        }
        let platform = self.platform.unwrap_or_default();
        match (self.family(), config.platform) {
            (Some(PlatformFamily::Container), PlatformSetting::Ec2) => out.push(locked(
                "METERD_PLATFORM",
                platform,
                "sets platform = \"ec2\"".to_owned(),
                "set platform to \"ecs\", \"eks\" or \"auto\"".to_owned(),
            )),
            (Some(PlatformFamily::Ami), PlatformSetting::Ecs | PlatformSetting::Eks) => {
                out.push(locked(
                    "METERD_PLATFORM",
                    platform,
                    format!("sets platform = {:?}", platform_name(config.platform)),
                    "set platform to \"ec2\" or \"auto\"".to_owned(),
                ))
            }
            _ => {}
        }
        let endpoint = config.aws.endpoint_url.as_str();
        if !endpoint.is_empty()
            && !is_aws_endpoint(endpoint)
            && self.baked_endpoint() != Some(endpoint)
        {
            out.push(locked(
                "METERD_PRODUCT_CODE",
                self.product_code.unwrap_or_default(),
                format!(
                    "sets aws.endpoint_url = {:?}, which is not an AWS endpoint",
                    config.aws.endpoint_url
                ),
                "leave aws.endpoint_url empty (the region's endpoint), or name an https://…amazonaws.com endpoint".to_owned(),
            ));
        }
        out
    }

    /// The endpoint baked into a locked test build, if any.
    pub fn baked_endpoint(&self) -> Option<&'static str> {
        self.endpoint_url
            .filter(|e| !e.is_empty() && self.is_locked())
    }

    /// The platform this build runs on, whatever the configuration or detection says: an
    /// `ami` build is always on EC2. `None` leaves the decision to configuration and detection.
    pub fn forced_platform(&self) -> Option<Platform> {
        (self.is_locked() && self.family() == Some(PlatformFamily::Ami)).then_some(Platform::Ec2)
    }

    /// Whether detection may ask IMDS (and so conclude EC2). A `container` build never does.
    pub fn may_probe_imds(&self) -> bool {
        !(self.is_locked() && self.family() == Some(PlatformFamily::Container))
    }

    /// One line saying what this build fixes, for `meterd keys` (a seller checks the image).
    pub fn describe(&self) -> String {
        if !self.is_locked() {
            return "build: unlocked (development): product code, pricing, platform, keys and endpoint come from the configuration".to_owned();
        }
        let mut line = format!(
            "build: locked: product {}, pricing {}, platform {}, keys/ only",
            self.product_code.unwrap_or_default(),
            self.pricing.unwrap_or_default(),
            self.platform.unwrap_or_default()
        );
        match self.baked_endpoint() {
            Some(e) => line.push_str(&format!(", endpoint {e} (a test build)")),
            None => line.push_str(", AWS endpoints only"),
        }
        line
    }
}

fn platform_name(p: PlatformSetting) -> &'static str {
    match p {
        PlatformSetting::Auto => "auto",
        PlatformSetting::Ecs => "ecs",
        PlatformSetting::Eks => "eks",
        PlatformSetting::Ec2 => "ec2",
    }
}

/// `https://` and a host under `amazonaws.com` (or `amazonaws.com.cn`), such as the regional
/// endpoint or a VPC endpoint's name.
pub fn is_aws_endpoint(url: &str) -> bool {
    let Ok(uri) = url.parse::<http::Uri>() else {
        return false;
    };
    let host = uri.host().unwrap_or("").to_ascii_lowercase();
    uri.scheme_str() == Some("https")
        && [".amazonaws.com", ".amazonaws.com.cn"]
            .iter()
            .any(|suffix| host.ends_with(suffix))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCKED: Baked = Baked {
        product_code: Some("prod-seller1234"),
        pricing: Some("hourly+custom"),
        platform: Some("container"),
        endpoint_url: None,
    };

    fn config(extra: &str) -> Config {
        let text = format!(
            "product_code = \"prod-seller1234\"\npricing = \"hourly+custom\"\n{extra}\n[metering]\ndimensions = [\"users\"]\n"
        );
        Config::from_toml_str(&text).unwrap_or_else(|e| panic!("{e}"))
    }

    fn refused(baked: Baked, config: &Config) -> Vec<&'static str> {
        baked.refusals(config).iter().map(|r| r.setting).collect()
    }

    #[test]
    fn describe_names_what_the_build_fixes() {
        assert_eq!(
            LOCKED.describe(),
            "build: locked: product prod-seller1234, pricing hourly+custom, platform container, keys/ only, AWS endpoints only"
        );
        let test_build = Baked {
            endpoint_url: Some("http://127.0.0.1:9"),
            ..LOCKED
        };
        assert!(test_build
            .describe()
            .ends_with("endpoint http://127.0.0.1:9 (a test build)"));
        let unbaked = Baked {
            product_code: None,
            ..LOCKED
        };
        assert!(unbaked.describe().starts_with("build: unlocked"));
    }

    #[test]
    fn an_unbaked_build_keeps_every_setting_open() {
        let unbaked = Baked {
            product_code: None,
            pricing: None,
            platform: None,
            endpoint_url: Some("http://127.0.0.1:1"),
        };
        assert_eq!(
            unbaked.baked_endpoint(),
            None,
            "only a locked build has one"
        );
        let mut c = config("platform = \"ec2\"");
        c.pricing = Pricing::Custom;
        c.aws.endpoint_url = "http://127.0.0.1:1".to_owned();
        assert!(unbaked.refusals(&c).is_empty());
        assert!(unbaked.may_probe_imds());
        assert_eq!(unbaked.forced_platform(), None);
    }

    #[test]
    fn a_baked_build_refuses_each_bypass_and_names_the_setting() {
        assert!(refused(LOCKED, &config("")).is_empty());
        let mut c = config("");
        c.pricing = Pricing::Custom;
        assert_eq!(refused(LOCKED, &c), ["METERD_PRICING"]);
        let c = config("platform = \"ec2\"");
        assert_eq!(refused(LOCKED, &c), ["METERD_PLATFORM"]);
        let mut c = config("");
        c.registration.public_key_files = vec!["/tmp/mine.pem".into()];
        let r = LOCKED.refusals(&c);
        assert_eq!(r.len(), 1);
        assert!(r[0].to_string().contains("public_key_files"), "{}", r[0]);
        let mut c = config("");
        c.aws.endpoint_url = "http://127.0.0.1:9999".to_owned();
        let r = LOCKED.refusals(&c);
        assert_eq!(r.len(), 1);
        assert!(r[0].to_string().contains("not an AWS endpoint"), "{}", r[0]);
        let test_build = Baked {
            endpoint_url: Some("http://127.0.0.1:9999"),
            ..LOCKED
        };
        assert!(
            test_build.refusals(&c).is_empty(),
            "the baked endpoint itself"
        );
        c.aws.endpoint_url = "http://127.0.0.1:9998".to_owned();
        assert_eq!(test_build.refusals(&c).len(), 1, "any other");
        let text = LOCKED.refusals(&c)[0].to_string();
        assert!(
            text.contains("METERD_PRODUCT_CODE=\"prod-seller1234\""),
            "{text}"
        );
    }

    #[test]
    fn the_platform_family_decides_detection() {
        assert!(
            !LOCKED.may_probe_imds(),
            "a container build never asks IMDS"
        );
        assert_eq!(LOCKED.forced_platform(), None);
        let ami = Baked {
            platform: Some("ami"),
            pricing: Some("custom"),
            ..LOCKED
        };
        assert!(ami.may_probe_imds());
        assert_eq!(ami.forced_platform(), Some(Platform::Ec2));
        let mut c = config("platform = \"eks\"");
        c.pricing = Pricing::Custom;
        assert_eq!(refused(ami, &c), ["METERD_PLATFORM"]);
    }

    #[test]
    fn only_https_aws_hosts_are_aws_endpoints() {
        for ok in [
            "https://metering.marketplace.us-east-1.amazonaws.com",
            "https://vpce-0abc-xyz.metering.marketplace.us-east-1.vpce.amazonaws.com",
            "https://metering.marketplace.cn-north-1.amazonaws.com.cn",
        ] {
            assert!(is_aws_endpoint(ok), "{ok}");
        }
        for bad in [
            "http://metering.marketplace.us-east-1.amazonaws.com",
            "https://amazonaws.com.evil.example",
            "https://evilamazonaws.com",
            "https://127.0.0.1",
            "not a url",
        ] {
            assert!(!is_aws_endpoint(bad), "{bad}");
        }
    }
}
