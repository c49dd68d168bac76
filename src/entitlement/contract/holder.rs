//! `ContractHolder`: the checkout held for the agent's life, its renewal, and the
//! application's floating checkouts, all kept in the ledger.

use super::*;

/// The ledger's state entry holding the checkout (JSON of [`ContractCheckout`]).
const HELD_KEY: &str = "contract";
/// The ledger's state entry with the ClientToken generation (see [`ContractHolder`]).
const GENERATION_KEY: &str = "contract.generation";
/// The ledger's state entry with the application's floating checkouts (JSON, by token).
const FLOATING_KEY: &str = "contract.floating";

/// Units of a floating entitlement the application checked out through meterd
/// (`POST /v1/entitlements/checkout`): held until it checks them in, or meterd stops.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Floating {
    pub token: String,
    pub name: String,
    pub unit: String,
    pub count: i64,
    pub expiration: Option<String>,
}

/// Why a floating checkout or check-in did not happen.
#[derive(Debug, thiserror::Error)]
pub enum FloatingError {
    #[error("no {name} left in the license's pool ({failure})")]
    NoneLeft { name: String, failure: CallFailure },
    #[error("meterd holds no checkout with token {0:?}")]
    NotHeld(String),
    #[error("License Manager did not answer: {0}")]
    Unavailable(CallFailure),
    #[error("License Manager refused: {0}")]
    Refused(CallFailure),
    #[error("{0}")]
    Ledger(String),
}

fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(text).ok()
}

/// The checkout an agent holds for its life, kept in the ledger so a restart reuses it.
///
/// - At start-up a held PROVISIONAL checkout is extended and reused, a held PERPETUAL one
///   reused as it is; otherwise a new checkout is made and written to the ledger.
/// - The ClientToken is `<instance id>-<generation>`: a crash between a checkout and its
///   write to the ledger checks out again with the same token and gets the same consumption
///   back. The generation moves on (durably, before the call) whenever that consumption can
///   no longer be used: checked in at shutdown, or found expired.
/// - While the agent runs, the checkout is extended at half its remaining time; one that was
///   lost (expired, say, while the service was unreachable) is checked out anew.
/// - On shutdown a PROVISIONAL checkout is checked in, so its units return to the pool at
///   once instead of an hour later.
pub struct ContractHolder {
    client: aws_sdk_licensemanager::Client,
    settings: ContractSettings,
    ledger: crate::ledger::Ledger,
    clock: SharedClock,
    held: std::sync::Mutex<Option<ContractCheckout>>,
    /// The application's floating checkouts, by token; written through to the ledger.
    floating: tokio::sync::Mutex<std::collections::BTreeMap<String, Floating>>,
}

impl ContractHolder {
    /// `settings.client_token` is replaced by the holder's own.
    pub fn new(
        client: aws_sdk_licensemanager::Client,
        settings: ContractSettings,
        ledger: crate::ledger::Ledger,
        clock: SharedClock,
    ) -> Self {
        Self {
            client,
            settings,
            ledger,
            clock,
            held: std::sync::Mutex::new(None),
            floating: tokio::sync::Mutex::new(std::collections::BTreeMap::new()),
        }
    }

    /// The application's floating checkouts.
    pub async fn floating(&self) -> Vec<Floating> {
        self.floating.lock().await.values().cloned().collect()
    }

    async fn store_floating(
        &self,
        floating: &std::collections::BTreeMap<String, Floating>,
    ) -> Result<(), String> {
        let value = if floating.is_empty() {
            None
        } else {
            Some(serde_json::to_string(floating).map_err(|e| e.to_string())?)
        };
        self.ledger
            .put_state(FLOATING_KEY, value)
            .await
            .map_err(|e| e.to_string())
    }

    /// Checks out `count` units of a floating entitlement for the application (PROVISIONAL).
    /// `request_id` makes a retried request the same checkout; without it every call is new.
    pub async fn checkout_floating(
        &self,
        name: &str,
        unit: &str,
        count: i64,
        request_id: Option<&str>,
    ) -> Result<Floating, FloatingError> {
        let wanted = entitlement_data(&WantedEntitlement {
            name: name.to_owned(),
            unit: unit.to_owned(),
            count: Some(count),
        })
        .map_err(|e| {
            FloatingError::Refused(CallFailure {
                code: Some("ValidationException".to_owned()),
                message: e.to_string(),
                status: None,
            })
        })?;
        let token = match request_id {
            Some(id) => format!("{}-app-{id}", self.ledger.identity().instance_id),
            None => {
                let random: [u8; 16] = rand::random();
                format!(
                    "{}-app-{}",
                    self.ledger.identity().instance_id,
                    hex::encode(random)
                )
            }
        };
        let answer = self
            .client
            .checkout_license()
            .product_sku(&self.settings.product_sku)
            .checkout_type(CheckoutType::Provisional)
            .key_fingerprint(&self.settings.key_fingerprint)
            .entitlements(wanted)
            .client_token(token)
            .send()
            .await
            .map_err(|e| CallFailure::from_sdk(&e));
        let out = match answer {
            Ok(out) => out,
            Err(f) if f.code_is("NoEntitlementsAllowedException") => {
                return Err(FloatingError::NoneLeft {
                    name: name.to_owned(),
                    failure: f,
                })
            }
            Err(f) if f.is_retryable() => return Err(FloatingError::Unavailable(f)),
            Err(f) => return Err(FloatingError::Refused(f)),
        };
        let held = Floating {
            token: out
                .license_consumption_token()
                .unwrap_or_default()
                .to_owned(),
            name: name.to_owned(),
            unit: unit.to_owned(),
            count,
            expiration: out.expiration().map(str::to_owned),
        };
        let mut floating = self.floating.lock().await;
        floating.insert(held.token.clone(), held.clone());
        self.store_floating(&floating)
            .await
            .map_err(FloatingError::Ledger)?;
        Ok(held)
    }

    /// Checks in a floating checkout the application holds through meterd.
    pub async fn check_in_floating(&self, token: &str) -> Result<(), FloatingError> {
        let mut floating = self.floating.lock().await;
        if !floating.contains_key(token) {
            return Err(FloatingError::NotHeld(token.to_owned()));
        }
        match self
            .client
            .check_in_license()
            .license_consumption_token(token)
            .send()
            .await
            .map_err(|e| CallFailure::from_sdk(&e))
        {
            Ok(_) => {}
            // Gone already (expired, say): it holds nothing either way.
            Err(f) if f.code_is("ResourceNotFoundException") || f.code_is("ConflictException") => {}
            Err(f) if f.is_retryable() => return Err(FloatingError::Unavailable(f)),
            Err(f) => return Err(FloatingError::Refused(f)),
        }
        floating.remove(token);
        self.store_floating(&floating)
            .await
            .map_err(FloatingError::Ledger)
    }

    /// Extends every floating checkout; those that cannot be extended any more are dropped.
    async fn extend_floating(&self) {
        let mut floating = self.floating.lock().await;
        let mut changed = false;
        let tokens: Vec<String> = floating.keys().cloned().collect();
        for token in tokens {
            match extend_once(&self.client, &token).await {
                Ok(expiration) => {
                    if let Some(f) = floating.get_mut(&token) {
                        f.expiration = expiration.or(f.expiration.take());
                        changed = true;
                    }
                }
                Err(failure) if failure.is_retryable() => {
                    warn!("ExtendLicenseConsumption for a floating checkout will be retried: {failure}");
                }
                Err(failure) => {
                    warn!("a floating checkout was lost ({failure}); the application must check out again");
                    floating.remove(&token);
                    changed = true;
                }
            }
        }
        if changed {
            if let Err(e) = self.store_floating(&floating).await {
                warn!("the ledger could not keep the floating checkouts: {e}");
            }
        }
    }

    /// What the agent holds now (for `GET /v1/entitlements`).
    pub fn held(&self) -> Option<ContractCheckout> {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    async fn store(&self, checkout: &ContractCheckout) -> Result<(), EntitlementError> {
        let json =
            serde_json::to_string(checkout).map_err(|e| EntitlementError::Held(e.to_string()))?;
        self.ledger
            .put_state(HELD_KEY, Some(json))
            .await
            .map_err(|e| EntitlementError::Held(e.to_string()))?;
        *self.held.lock().unwrap_or_else(|e| e.into_inner()) = Some(checkout.clone());
        Ok(())
    }

    async fn generation(&self) -> Result<u64, EntitlementError> {
        let stored = self
            .ledger
            .state(GENERATION_KEY)
            .await
            .map_err(|e| EntitlementError::Held(e.to_string()))?;
        Ok(stored.and_then(|g| g.parse().ok()).unwrap_or(0))
    }

    async fn next_generation(&self) -> Result<(), EntitlementError> {
        let next = self.generation().await?.saturating_add(1);
        self.ledger
            .put_state(GENERATION_KEY, Some(next.to_string()))
            .await
            .map_err(|e| EntitlementError::Held(e.to_string()))
    }

    async fn checkout_now(
        &self,
        observer: &(dyn Fn(SystemTime) + Send + Sync),
    ) -> Result<ContractCheckout, EntitlementError> {
        let mut settings = self.settings.clone();
        settings.client_token = format!(
            "{}-{}",
            self.ledger.identity().instance_id,
            self.generation().await?
        );
        let checkout = checkout_observed(&self.client, &settings, &self.clock, observer).await?;
        self.store(&checkout).await?;
        Ok(checkout)
    }

    /// The start-up check: reuse what the ledger says is held, else check out. The
    /// application's floating checkouts a previous run held are extended (or dropped if gone).
    pub async fn establish(
        &self,
        observer: &(dyn Fn(SystemTime) + Send + Sync),
    ) -> Result<ContractCheckout, EntitlementError> {
        let floating = self
            .ledger
            .state(FLOATING_KEY)
            .await
            .map_err(|e| EntitlementError::Held(e.to_string()))?
            .and_then(|json| serde_json::from_str(&json).ok())
            .unwrap_or_default();
        *self.floating.lock().await = floating;
        self.extend_floating().await;
        let checkout = self.establish_main(observer).await?;
        Ok(checkout)
    }

    async fn establish_main(
        &self,
        observer: &(dyn Fn(SystemTime) + Send + Sync),
    ) -> Result<ContractCheckout, EntitlementError> {
        let stored = self
            .ledger
            .state(HELD_KEY)
            .await
            .map_err(|e| EntitlementError::Held(e.to_string()))?
            .and_then(|json| serde_json::from_str::<ContractCheckout>(&json).ok());
        if let Some(mut held) = stored {
            if held.checkout_type == "PERPETUAL" {
                info!(license = %held.license_arn, "reusing the perpetual checkout in the ledger");
                self.store(&held).await?;
                return Ok(held);
            }
            match extend_once(&self.client, &held.consumption_token).await {
                Ok(expiration) => {
                    info!(license = %held.license_arn, "reusing the checkout in the ledger (extended)");
                    held.expiration = expiration.or(held.expiration);
                    self.store(&held).await?;
                    return Ok(held);
                }
                Err(failure) => {
                    warn!("the checkout in the ledger cannot be extended ({failure}); checking out anew");
                    self.next_generation().await?;
                }
            }
        }
        log_failure(self.checkout_now(observer).await)
    }

    /// Extends the checkout at half its remaining time until `stop`; a lost one is checked out
    /// anew. `on_lost` hears of a checkout that could not be renewed.
    pub async fn keep_alive(
        &self,
        stop: tokio_util::sync::CancellationToken,
        on_lost: impl Fn(&EntitlementError),
    ) {
        loop {
            let Some(held) = self.held() else { return };
            let now = self.clock.now();
            // The nearest expiry among the agent's checkout and the application's floating ones.
            let expiries: Vec<SystemTime> = held
                .expiration
                .iter()
                .cloned()
                .chain(
                    self.floating()
                        .await
                        .into_iter()
                        .filter_map(|f| f.expiration),
                )
                .filter_map(|e| parse_rfc3339(&e))
                .collect();
            let Some(nearest) = expiries.iter().min().copied() else {
                // PERPETUAL and nothing floating: wake once a while for floating checkouts.
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = self.clock.sleep_until(now + Duration::from_secs(60)) => continue,
                }
            };
            let remaining = nearest.duration_since(now).unwrap_or_default();
            let at = now + (remaining / 2).max(Duration::from_secs(30));
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.clock.sleep_until(at) => {}
            }
            self.extend_floating().await;
            let Some(expires) = held.expiration.as_deref().and_then(parse_rfc3339) else {
                continue; // PERPETUAL: nothing to extend.
            };
            match extend_once(&self.client, &held.consumption_token).await {
                Ok(expiration) => {
                    let renewed = ContractCheckout {
                        expiration: expiration.or(held.expiration.clone()),
                        ..held
                    };
                    if let Err(e) = self.store(&renewed).await {
                        on_lost(&e);
                    }
                }
                Err(failure) if failure.is_retryable() && self.clock.now() < expires => {
                    warn!("ExtendLicenseConsumption will be retried: {failure}");
                }
                Err(failure) => {
                    warn!("the checkout was lost ({failure}); checking out anew");
                    let renewed = match self.next_generation().await {
                        Ok(()) => self.checkout_now(&|_| {}).await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = renewed {
                        on_lost(&e);
                        // Try again at the next pass, a back-off later.
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = self.clock.sleep_until(self.clock.now() + self.settings.backoff.max()) => {}
                        }
                    }
                }
            }
        }
    }

    /// Checks in the application's floating checkouts and a PROVISIONAL checkout (shutdown):
    /// their units go back to the pool now.
    pub async fn release(&self) {
        for f in self.floating().await {
            if let Err(e) = self.check_in_floating(&f.token).await {
                warn!("a floating checkout was not checked in ({e}); it expires on its own");
            }
        }
        let Some(held) = self.held() else { return };
        if held.checkout_type != "PROVISIONAL" {
            return;
        }
        // The generation moves first: a crash after the check-in must not reuse its token.
        if let Err(e) = self.next_generation().await {
            warn!("could not record the check-in's generation: {e}");
            return;
        }
        match self
            .client
            .check_in_license()
            .license_consumption_token(&held.consumption_token)
            .send()
            .await
        {
            Ok(_) => {
                info!(license = %held.license_arn, "checked in the license consumption");
                *self.held.lock().unwrap_or_else(|e| e.into_inner()) = None;
                if let Err(e) = self.ledger.put_state(HELD_KEY, None).await {
                    warn!("checked in, but the ledger still names the checkout: {e}");
                }
            }
            Err(e) => warn!(
                "CheckInLicense failed ({}); the units return to the pool when the consumption expires",
                CallFailure::from_sdk(&e)
            ),
        }
    }
}

/// One ExtendLicenseConsumption: the new expiration.
async fn extend_once(
    client: &aws_sdk_licensemanager::Client,
    token: &str,
) -> Result<Option<String>, CallFailure> {
    client
        .extend_license_consumption()
        .license_consumption_token(token)
        .send()
        .await
        .map(|out| out.expiration().map(str::to_owned))
        .map_err(|e| CallFailure::from_sdk(&e))
}
