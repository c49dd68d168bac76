//! The Metering Service emulator, driven by the real Rust SDK (and raw HTTP where the SDK
//! cannot send a malformed request). Time moves only through a `ManualClock`.
#![cfg(feature = "emulator")]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_marketplacemetering::operation::meter_usage::builders::MeterUsageFluentBuilder;
use aws_sdk_marketplacemetering::operation::register_usage::builders::RegisterUsageFluentBuilder;
use aws_sdk_marketplacemetering::primitives::DateTime;
use aws_sdk_marketplacemetering::types::{
    Tag, UsageAllocation, UsageRecord, UsageRecordResultStatus,
};
use aws_sdk_marketplacemetering::Client;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

use meterd::aws::{build_client, AwsSettings, CallFailure};
use meterd::clock::{hour_floor, Clock, ManualClock};
use meterd::emulator::config::{
    CustomerConfig, KeyConfig, LicenseConfig, RegistrationTokenConfig, DEMO_LICENSE_ARN,
    DEMO_SIGNING_KEY_PEM,
};
use meterd::emulator::sigv4::Signer;
use meterd::emulator::{
    self, EmulatorConfig, EmulatorHandle, Entitlement, FaultProfile, FaultRule, InjectedFault,
    Operation, Outcome,
};

use meterd_test_support::{H0, PRODUCT};

/// 2027-01-15T08:30:00Z: half past an hour.
const T0: i64 = H0 + 1800;

struct Env {
    emu: EmulatorHandle,
    clock: Arc<ManualClock>,
}

async fn start(config: EmulatorConfig) -> Env {
    let clock = ManualClock::at_unix(T0);
    let emu = emulator::start(config, clock.clone(), "127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("emulator starts");
    Env { emu, clock }
}

impl Env {
    fn now(&self) -> i64 {
        meterd::clock::unix_seconds(self.clock.now())
    }

    async fn client(&self, key: &str, secret: &str, region: &str) -> Client {
        build_client(&AwsSettings {
            region: Some(region.to_owned()),
            endpoint_url: Some(self.emu.endpoint_url()),
            static_credentials: Some((key.to_owned(), secret.to_owned())),
            operation_timeout: Some(Duration::from_secs(20)),
        })
        .await
    }

    async fn default_client(&self) -> Client {
        self.client("AKIDTASK1", "secret", "us-east-1").await
    }
}

fn code<E>(
    err: &aws_sdk_marketplacemetering::error::SdkError<
        E,
        aws_sdk_marketplacemetering::config::http::HttpResponse,
    >,
) -> String
where
    E: aws_sdk_marketplacemetering::error::ProvideErrorMetadata + std::error::Error + 'static,
{
    CallFailure::from_sdk(err)
        .code
        .unwrap_or_else(|| "transport".to_owned())
}

fn tag(k: &str, v: &str) -> Tag {
    Tag::builder().key(k).value(v).build().expect("tag")
}

fn alloc(quantity: i32, tags: &[(&str, &str)]) -> UsageAllocation {
    let tags: Vec<Tag> = tags.iter().map(|(k, v)| tag(k, v)).collect();
    UsageAllocation::builder()
        .allocated_usage_quantity(quantity)
        .set_tags(if tags.is_empty() { None } else { Some(tags) })
        .build()
        .expect("allocation")
}

/// MeterUsage of the test product for a dimension-hour; callers add the rest.
fn meter_call(client: &Client, dimension: &str, timestamp: i64) -> MeterUsageFluentBuilder {
    client
        .meter_usage()
        .product_code(PRODUCT)
        .usage_dimension(dimension)
        .timestamp(DateTime::from_secs(timestamp))
}

/// RegisterUsage of the test product at a public key version; callers add the rest.
fn register_call(client: &Client, version: i32) -> RegisterUsageFluentBuilder {
    client
        .register_usage()
        .product_code(PRODUCT)
        .public_key_version(version)
}

async fn meter(
    client: &Client,
    dimension: &str,
    timestamp: i64,
    quantity: i32,
    allocations: Option<Vec<UsageAllocation>>,
) -> Result<String, String> {
    meter_call(client, dimension, timestamp)
        .usage_quantity(quantity)
        .set_usage_allocations(allocations)
        .send()
        .await
        .map(|o| o.metering_record_id().unwrap_or_default().to_owned())
        .map_err(|e| code(&e))
}

/// One raw HTTP/1.1 exchange, its body as JSON (`Null` when not JSON); `None` when the
/// connection closed without a response.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: http::HeaderMap,
    body: Vec<u8>,
) -> Option<(u16, Value)> {
    let (status, bytes) = http_bytes(addr, method, path, headers, body).await?;
    Some((
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    ))
}

async fn http_bytes(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: http::HeaderMap,
    body: Vec<u8>,
) -> Option<(u16, Bytes)> {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .body(Full::new(Bytes::from(body)))
        .expect("request");
    *req.headers_mut() = headers;
    let resp = sender.send_request(req).await.ok()?;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, bytes))
}

/// A protocol call signed (when `key` is given) like an SDK signs it.
async fn raw_call(
    env: &Env,
    op: &str,
    body: &Value,
    key: Option<(&str, &str)>,
) -> Option<(u16, Value)> {
    let body = body.to_string().into_bytes();
    raw_bytes(env, op, body, key).await
}

async fn raw_bytes(
    env: &Env,
    op: &str,
    body: Vec<u8>,
    key: Option<(&str, &str)>,
) -> Option<(u16, Value)> {
    let mut headers = http::HeaderMap::new();
    headers.insert("host", env.emu.addr().to_string().parse().expect("host"));
    headers.insert(
        "content-type",
        "application/x-amz-json-1.1".parse().expect("ct"),
    );
    headers.insert(
        "x-amz-target",
        format!("AWSMPMeteringService.{op}")
            .parse()
            .expect("target"),
    );
    if let Some((key, secret)) = key {
        Signer {
            access_key_id: key,
            secret,
            region: "us-east-1",
        }
        .sign(&mut headers, "POST", "/", &body, env.clock.now());
    }
    http(env.emu.addr(), "POST", "/", headers, body).await
}

fn error_type(answer: &Option<(u16, Value)>) -> (u16, String) {
    let (status, body) = answer.as_ref().expect("a response");
    (
        *status,
        body["__type"].as_str().unwrap_or("<none>").to_owned(),
    )
}

async fn admin_get(env: &Env, path: &str) -> Value {
    let mut headers = http::HeaderMap::new();
    headers.insert("host", env.emu.addr().to_string().parse().expect("host"));
    let (status, body) = http(env.emu.addr(), "GET", path, headers, Vec::new())
        .await
        .expect("admin answers");
    assert_eq!(status, 200, "{path}: {body}");
    body
}

async fn admin_post(env: &Env, path: &str, body: Value) -> (u16, Value) {
    let mut headers = http::HeaderMap::new();
    headers.insert("host", env.emu.addr().to_string().parse().expect("host"));
    headers.insert("content-type", "application/json".parse().expect("ct"));
    http(
        env.emu.addr(),
        "POST",
        path,
        headers,
        body.to_string().into_bytes(),
    )
    .await
    .expect("admin answers")
}

// ---------------------------------------------------------------- MeterUsage

#[tokio::test]
async fn meter_usage_once_per_identity_product_dimension_hour() {
    let env = start(EmulatorConfig::demo()).await;
    let task1 = env.default_client().await;
    let task2 = env.client("AKIDTASK2", "secret", "us-east-1").await;
    let hour = hour_floor(T0) - 3600;

    let id = meter(&task1, "requests", hour + 10, 7, None)
        .await
        .expect("first report");
    // Identical after rounding down to the hour: the same record id.
    assert_eq!(
        meter(&task1, "requests", hour + 3599, 7, None).await,
        Ok(id.clone())
    );
    // A different quantity, or different allocations, for the same hour: duplicate.
    assert_eq!(
        meter(&task1, "requests", hour, 8, None).await,
        Err("DuplicateRequestException".into())
    );
    assert_eq!(
        meter(
            &task1,
            "requests",
            hour,
            7,
            Some(vec![alloc(7, &[("team", "a")])])
        )
        .await,
        Err("DuplicateRequestException".into())
    );
    // Other dimension, other identity (task), other hour: each its own record.
    let other_dim = meter(&task1, "gigabytes", hour, 8, None)
        .await
        .expect("other dimension");
    let other_task = meter(&task2, "requests", hour, 9, None)
        .await
        .expect("other task");
    let other_hour = meter(&task1, "requests", hour - 3600, 1, None)
        .await
        .expect("other hour");
    let ids = [&id, &other_dim, &other_task, &other_hour];
    for (i, a) in ids.iter().enumerate() {
        for b in &ids[i + 1..] {
            assert_ne!(a, b);
        }
    }

    let records = env.emu.records();
    assert_eq!(records.len(), 4);
    assert_eq!(records[0].identity, "AKIDTASK1");
    assert_eq!(records[0].hour, hour);
    assert_eq!(records[0].timestamp, (hour + 10) as f64);
    assert_eq!(records[0].quantity, 7);
    assert_eq!(records[0].metering_record_id, id);
    assert!(
        records[0].client_token.is_some(),
        "the SDK fills in a ClientToken"
    );
    assert_eq!(records[2].identity, "AKIDTASK2");
}

#[tokio::test]
async fn meter_usage_allocations_compare_as_sets() {
    let env = start(EmulatorConfig::demo()).await;
    let c = env.default_client().await;
    let t = T0 - 600;
    let a = vec![alloc(3, &[("team", "a"), ("env", "prod")]), alloc(2, &[])];
    let id = meter(&c, "requests", t, 5, Some(a))
        .await
        .expect("accepted");
    let reordered = vec![alloc(2, &[]), alloc(3, &[("env", "prod"), ("team", "a")])];
    assert_eq!(meter(&c, "requests", t, 5, Some(reordered)).await, Ok(id));
    let records = env.emu.records();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].allocations.len(), 2);
}

#[tokio::test]
async fn meter_usage_timestamp_window() {
    let env = start(EmulatorConfig::demo()).await;
    let skew = 300;
    // (case, offset from now, expected). Each case meters as its own task.
    let cases: [(&str, i64, Result<(), &str>); 6] = [
        ("now", 0, Ok(())),
        ("6 hours ago exactly", -6 * 3600, Ok(())),
        (
            "6 hours and 1 second ago",
            -6 * 3600 - 1,
            Err("TimestampOutOfBoundsException"),
        ),
        ("a day ago", -86_400, Err("TimestampOutOfBoundsException")),
        ("within the future skew", skew, Ok(())),
        (
            "beyond the future skew",
            skew + 1,
            Err("TimestampOutOfBoundsException"),
        ),
    ];
    for (i, (name, offset, want)) in cases.iter().enumerate() {
        let c = env
            .client(&format!("AKIDWINDOW{i}"), "s", "us-east-1")
            .await;
        let got = meter(&c, "requests", env.now() + offset, 1, None)
            .await
            .map(|_| ());
        assert_eq!(got, want.map_err(str::to_owned), "{name}");
    }
    assert_eq!(env.emu.records().len(), 3);
    // Moving the clock moves the window.
    env.clock.advance(Duration::from_secs(3600));
    let c = env.client("AKIDWINDOWX", "s", "us-east-1").await;
    assert_eq!(
        meter(&c, "requests", env.now() - 6 * 3600 - 1, 1, None).await,
        Err("TimestampOutOfBoundsException".into())
    );
}

#[tokio::test]
async fn meter_usage_allocation_and_tag_rules() {
    let mut config = EmulatorConfig::demo();
    config.max_usage_allocations = 4;
    let env = start(config).await;
    let keys6: Vec<(String, String)> = (0..6).map(|i| (format!("k{i}"), "v".to_owned())).collect();
    let keys6: Vec<(&str, &str)> = keys6
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let key101 = "k".repeat(101);
    let value257 = "v".repeat(257);
    type Case<'a> = (&'a str, i32, Vec<UsageAllocation>, Result<(), &'a str>);
    let cases: Vec<Case> = vec![
        (
            "sum equals quantity",
            5,
            vec![alloc(3, &[("a", "1")]), alloc(2, &[])],
            Ok(()),
        ),
        (
            "sum differs from quantity",
            5,
            vec![alloc(3, &[("a", "1")])],
            Err("InvalidUsageAllocationsException"),
        ),
        (
            "tag sets not unique",
            2,
            vec![alloc(1, &[("a", "1")]), alloc(1, &[("a", "1")])],
            Err("InvalidUsageAllocationsException"),
        ),
        (
            "two untagged buckets",
            2,
            vec![alloc(1, &[]), alloc(1, &[])],
            Err("InvalidUsageAllocationsException"),
        ),
        (
            "more allocations than the configured limit",
            5,
            (0..5).map(|i| alloc(1, &[("a", &i.to_string())])).collect(),
            Err("InvalidUsageAllocationsException"),
        ),
        (
            "at the configured limit",
            4,
            (0..4).map(|i| alloc(1, &[("a", &i.to_string())])).collect(),
            Ok(()),
        ),
        (
            "6 tags on one allocation",
            1,
            vec![alloc(1, &keys6)],
            Err("InvalidTagException"),
        ),
        (
            "6 distinct keys across the list",
            2,
            vec![alloc(1, &keys6[..5]), alloc(1, &keys6[5..])],
            Err("InvalidTagException"),
        ),
        (
            "5 distinct keys across the list",
            2,
            vec![alloc(1, &keys6[..3]), alloc(1, &keys6[3..5])],
            Ok(()),
        ),
        (
            "key of 101 characters",
            1,
            vec![alloc(1, &[(&key101, "v")])],
            Err("InvalidTagException"),
        ),
        (
            "key of 100 characters",
            1,
            vec![alloc(1, &[(&key101[..100], "v")])],
            Ok(()),
        ),
        (
            "value of 257 characters",
            1,
            vec![alloc(1, &[("k", &value257)])],
            Err("InvalidTagException"),
        ),
        (
            "value of 256 characters",
            1,
            vec![alloc(1, &[("k", &value257[..256])])],
            Ok(()),
        ),
        (
            "key outside the pattern",
            1,
            vec![alloc(1, &[("team?", "a")])],
            Err("InvalidTagException"),
        ),
        (
            "value outside the pattern",
            1,
            vec![alloc(1, &[("team", "a>b")])],
            Err("InvalidTagException"),
        ),
        (
            "the space..= range and + . _ : / @",
            1,
            vec![alloc(1, &[("a b!#$%&'()*+,-./:;<=", "x_y.z:/@")])],
            Ok(()),
        ),
    ];
    let before = env.emu.records().len();
    let mut accepted = 0;
    for (i, (name, quantity, allocations, want)) in cases.into_iter().enumerate() {
        let c = env.client(&format!("AKIDALLOC{i}"), "s", "us-east-1").await;
        let got = meter(&c, "requests", T0, quantity, Some(allocations))
            .await
            .map(|_| ());
        if got.is_ok() {
            accepted += 1;
        }
        assert_eq!(got, want.map_err(str::to_owned), "{name}");
    }
    assert_eq!(
        env.emu.records().len(),
        before + accepted,
        "rejected calls store nothing"
    );
}

#[tokio::test]
async fn meter_usage_default_allocation_limit_is_500() {
    let env = start(EmulatorConfig::demo()).await;
    let c = env.default_client().await;
    let many = |n: i32| {
        (0..n)
            .map(|i| alloc(1, &[("n", &i.to_string())]))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        meter(&c, "requests", T0, 501, Some(many(501))).await,
        Err("InvalidUsageAllocationsException".into())
    );
    assert!(meter(&c, "requests", T0, 500, Some(many(500)))
        .await
        .is_ok());
}

#[tokio::test]
async fn meter_usage_product_dimension_region_entitlement_dry_run_and_client_token() {
    let env = start(EmulatorConfig::demo()).await;
    let c = env.default_client().await;
    let send = |product: &'static str, dimension: &'static str| {
        c.meter_usage()
            .product_code(product)
            .usage_dimension(dimension)
            .timestamp(DateTime::from_secs(T0))
            .usage_quantity(1)
    };
    let e = send("prod-unknown", "requests")
        .send()
        .await
        .expect_err("unknown product");
    assert_eq!(code(&e), "InvalidProductCodeException");
    let e = send(PRODUCT, "seats")
        .send()
        .await
        .expect_err("unknown dimension");
    assert_eq!(code(&e), "InvalidUsageDimensionException");

    // DryRun: success is the DryRunOperation error, and nothing is stored.
    let e = send(PRODUCT, "requests")
        .dry_run(true)
        .send()
        .await
        .expect_err("dry run");
    assert_eq!(code(&e), "DryRunOperation");
    assert!(env.emu.records().is_empty());

    // ClientToken: same token, same parameters → same answer; different parameters → conflict.
    let id = send(PRODUCT, "requests")
        .client_token("tok-1")
        .send()
        .await
        .expect("first");
    let again = send(PRODUCT, "requests")
        .client_token("tok-1")
        .send()
        .await
        .expect("retry");
    assert_eq!(id.metering_record_id(), again.metering_record_id());
    let e = send(PRODUCT, "gigabytes")
        .client_token("tok-1")
        .send()
        .await
        .expect_err("conflict");
    assert_eq!(code(&e), "IdempotencyConflictException");
    assert_eq!(env.emu.records().len(), 1);

    // Signing for another region than the endpoint's.
    let west = env.client("AKIDTASK1", "secret", "us-west-2").await;
    let e = meter_call(&west, "gigabytes", T0)
        .send()
        .await
        .expect_err("wrong region");
    assert_eq!(code(&e), "InvalidEndpointRegionException");

    env.emu
        .set_entitlement(PRODUCT, Entitlement::NotEntitled)
        .expect("known product");
    let e = send(PRODUCT, "gigabytes")
        .send()
        .await
        .expect_err("not entitled");
    assert_eq!(code(&e), "CustomerNotEntitledException");
    assert_eq!(env.emu.records().len(), 1);
}

#[tokio::test]
async fn model_constraints_answer_validation_or_serialization_errors() {
    let env = start(EmulatorConfig::demo()).await;
    let key = Some(("AKIDRAW", "s"));
    let ok = json!({"ProductCode": PRODUCT, "UsageDimension": "requests", "Timestamp": T0, "UsageQuantity": 1});
    let with = |k: &str, v: Value| {
        let mut b = ok.clone();
        b[k] = v;
        b
    };
    let without = |k: &str| {
        let mut b = ok.clone();
        b.as_object_mut().expect("object").remove(k);
        b
    };
    let too_many: Vec<Value> = (0..2501).map(|i| json!({"AllocatedUsageQuantity": 0, "Tags": [{"Key": "n", "Value": i.to_string()}]})).collect();
    let cases: Vec<(&str, &str, Value, &str)> = vec![
        (
            "MeterUsage",
            "missing ProductCode",
            without("ProductCode"),
            "ValidationException",
        ),
        (
            "MeterUsage",
            "missing Timestamp",
            without("Timestamp"),
            "ValidationException",
        ),
        (
            "MeterUsage",
            "missing UsageDimension",
            without("UsageDimension"),
            "ValidationException",
        ),
        (
            "MeterUsage",
            "ProductCode outside pattern",
            with("ProductCode", json!("prod demo!")),
            "ValidationException",
        ),
        (
            "MeterUsage",
            "ProductCode of 256 characters",
            with("ProductCode", json!("p".repeat(256))),
            "ValidationException",
        ),
        (
            "MeterUsage",
            "empty UsageDimension",
            with("UsageDimension", json!("")),
            "ValidationException",
        ),
        (
            "MeterUsage",
            "UsageDimension of 256 characters",
            with("UsageDimension", json!("d".repeat(256))),
            "ValidationException",
        ),
        (
            "MeterUsage",
            "negative UsageQuantity",
            with("UsageQuantity", json!(-1)),
            "ValidationException",
        ),
        (
            "MeterUsage",
            "UsageQuantity above 2147483647",
            with("UsageQuantity", json!(2_147_483_648_i64)),
            "ValidationException",
        ),
        (
            "MeterUsage",
            "ClientToken of 65 characters",
            with("ClientToken", json!("t".repeat(65))),
            "ValidationException",
        ),
        (
            "MeterUsage",
            "empty ClientToken",
            with("ClientToken", json!("")),
            "ValidationException",
        ),
        (
            "MeterUsage",
            "empty UsageAllocations",
            with("UsageAllocations", json!([])),
            "ValidationException",
        ),
        (
            "MeterUsage",
            "more than 2500 allocations",
            with("UsageAllocations", Value::Array(too_many)),
            "ValidationException",
        ),
        (
            "MeterUsage",
            "allocation without quantity",
            with(
                "UsageAllocations",
                json!([{"Tags": [{"Key": "a", "Value": "b"}]}]),
            ),
            "ValidationException",
        ),
        (
            "MeterUsage",
            "negative allocation",
            with("UsageAllocations", json!([{"AllocatedUsageQuantity": -1}])),
            "ValidationException",
        ),
        (
            "MeterUsage",
            "Timestamp as text",
            with("Timestamp", json!("2027-01-15T08:00:00Z")),
            "SerializationException",
        ),
        (
            "MeterUsage",
            "UsageQuantity as text",
            with("UsageQuantity", json!("1")),
            "SerializationException",
        ),
        (
            "RegisterUsage",
            "PublicKeyVersion 0",
            json!({"ProductCode": PRODUCT, "PublicKeyVersion": 0}),
            "ValidationException",
        ),
        (
            "RegisterUsage",
            "missing PublicKeyVersion",
            json!({"ProductCode": PRODUCT}),
            "ValidationException",
        ),
        (
            "RegisterUsage",
            "Nonce of 256 characters",
            json!({"ProductCode": PRODUCT, "PublicKeyVersion": 1, "Nonce": "n".repeat(256)}),
            "ValidationException",
        ),
        (
            "ResolveCustomer",
            "empty RegistrationToken",
            json!({"RegistrationToken": ""}),
            "ValidationException",
        ),
        (
            "ResolveCustomer",
            "missing RegistrationToken",
            json!({}),
            "ValidationException",
        ),
        (
            "BatchMeterUsage",
            "missing UsageRecords",
            json!({"ProductCode": PRODUCT}),
            "ValidationException",
        ),
        (
            "BatchMeterUsage",
            "account id not digits",
            json!({"ProductCode": PRODUCT, "UsageRecords": [{"Timestamp": T0, "Dimension": "requests", "CustomerAWSAccountId": "12ab"}]}),
            "ValidationException",
        ),
        (
            "BatchMeterUsage",
            "record without Dimension",
            json!({"ProductCode": PRODUCT, "UsageRecords": [{"Timestamp": T0, "CustomerIdentifier": "cust-demo-1"}]}),
            "ValidationException",
        ),
    ];
    for (op, name, body, want) in cases {
        let answer = raw_call(&env, op, &body, key).await;
        assert_eq!(error_type(&answer), (400, want.to_owned()), "{op}: {name}");
    }
    let (_, body) = raw_call(&env, "MeterUsage", &without("ProductCode"), key)
        .await
        .expect("answer");
    assert_eq!(
        body["message"],
        "1 validation error detected: Value null at 'productCode' failed to satisfy constraint: Member must not be null"
    );
    assert!(env.emu.records().is_empty());
    assert!(env.emu.batch_records().is_empty());
    let answer = raw_bytes(&env, "MeterUsage", b"{not json".to_vec(), key).await;
    assert_eq!(
        error_type(&answer),
        (400, "SerializationException".to_owned())
    );
    let answer = raw_call(&env, "DeleteEverything", &json!({}), key).await;
    assert_eq!(
        error_type(&answer),
        (400, "UnknownOperationException".to_owned())
    );
}

#[tokio::test]
async fn zero_usage_is_a_record_and_disabled_apis_answer_disabled_api_exception() {
    let mut config = EmulatorConfig::demo();
    config.disabled_operations = vec![Operation::BatchMeterUsage, Operation::ResolveCustomer];
    let env = start(config).await;
    let c = env.default_client().await;
    meter(&c, "requests", T0 - 3600, 0, None)
        .await
        .expect("a zero record");
    assert_eq!(env.emu.records()[0].quantity, 0);
    let e = c
        .batch_meter_usage()
        .product_code(PRODUCT)
        .usage_records(record(Some("cust-demo-1"), None, "requests", T0, 1))
        .send()
        .await
        .expect_err("disabled");
    assert_eq!(code(&e), "DisabledApiException");
    let e = c
        .resolve_customer()
        .registration_token("demo-token-1")
        .send()
        .await
        .expect_err("disabled");
    assert_eq!(code(&e), "DisabledApiException");
    register_call(&c, 1).send().await.expect("enabled");
    assert!(env.emu.batch_records().is_empty());
}

// ---------------------------------------------------------------- RegisterUsage

fn decode_jwt(token: &str, pem: &str) -> Value {
    let key = jsonwebtoken::DecodingKey::from_rsa_pem(pem.as_bytes()).expect("public key");
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::PS256);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    let header = jsonwebtoken::decode_header(token).expect("header");
    assert_eq!(header.alg, jsonwebtoken::Algorithm::PS256);
    assert_eq!(header.typ.as_deref(), Some("JWT"));
    jsonwebtoken::decode::<Value>(token, &key, &validation)
        .expect("PS256 signature verifies")
        .claims
}

#[tokio::test]
async fn register_usage_signs_a_ps256_jwt_with_the_nonce() {
    let mut config = EmulatorConfig::demo();
    config.keys.push(KeyConfig {
        version: 2,
        private_key_path: None,
        private_key_pem: Some(DEMO_SIGNING_KEY_PEM.to_owned()),
        expired_at: Some(meterd::clock::from_unix_seconds(T0 - 86_400)),
    });
    let env = start(config).await;
    let c = env.default_client().await;
    let out = register_call(&c, 1)
        .nonce("nonce-123")
        .send()
        .await
        .expect("registered");
    assert!(
        out.public_key_rotation_timestamp().is_none(),
        "version 1 has not expired"
    );
    let pem = env.emu.public_key_pem(1).expect("version 1 key");
    assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----"));
    let claims = decode_jwt(out.signature().expect("signature"), &pem);
    assert_eq!(
        claims,
        json!({"productCode": PRODUCT, "publicKeyVersion": 1, "nonce": "nonce-123", "iat": T0})
    );

    // An expired key version still signs, and says when it rotated.
    let out = register_call(&c, 2)
        .nonce("n2")
        .send()
        .await
        .expect("registered");
    assert_eq!(
        out.public_key_rotation_timestamp().map(|t| t.secs()),
        Some(T0 - 86_400)
    );
    assert_eq!(
        decode_jwt(
            out.signature().expect("sig"),
            &env.emu.public_key_pem(2).expect("v2")
        )["publicKeyVersion"],
        2
    );

    let e = register_call(&c, 3)
        .send()
        .await
        .expect_err("unknown version");
    assert_eq!(code(&e), "InvalidPublicKeyVersionException");
    let e = c
        .register_usage()
        .product_code("prod-other")
        .public_key_version(1)
        .send()
        .await
        .expect_err("unknown product");
    assert_eq!(code(&e), "InvalidProductCodeException");
    let west = env.client("AKIDTASK1", "secret", "eu-west-1").await;
    let e = register_call(&west, 1)
        .send()
        .await
        .expect_err("wrong region");
    assert_eq!(code(&e), "InvalidRegionException");
}

#[tokio::test]
async fn register_usage_entitlement_errors_only_on_an_identitys_first_call() {
    let env = start(EmulatorConfig::demo()).await;
    let register = |c: Client| async move {
        register_call(&c, 1)
            .nonce("n")
            .send()
            .await
            .map(|_| ())
            .map_err(|e| code(&e))
    };
    // A task registered while entitled stays fine after the customer unsubscribes.
    let early = env.client("AKIDEARLY", "s", "us-east-1").await;
    assert_eq!(register(early.clone()).await, Ok(()));

    let cases: [(Entitlement, &str, Result<(), &str>); 3] = [
        (
            Entitlement::NotEntitled,
            "CustomerNotEntitledException",
            Ok(()),
        ),
        (
            Entitlement::PlatformNotSupported,
            "PlatformNotSupportedException",
            Ok(()),
        ),
        (
            Entitlement::WrongRegion,
            "InvalidRegionException",
            Err("InvalidRegionException"),
        ),
    ];
    for (i, (mode, first, later)) in cases.into_iter().enumerate() {
        env.emu
            .set_entitlement(PRODUCT, mode)
            .expect("known product");
        let task = env.client(&format!("AKIDENT{i}"), "s", "us-east-1").await;
        assert_eq!(
            register(task.clone()).await,
            Err(first.to_owned()),
            "{mode:?}: first call"
        );
        assert_eq!(
            register(task.clone()).await,
            later.map_err(str::to_owned),
            "{mode:?}: second call"
        );
        if mode != Entitlement::WrongRegion {
            assert_eq!(
                register(early.clone()).await,
                Ok(()),
                "{mode:?}: an already registered task"
            );
        }
    }
    // Set at run time through the admin API as well.
    let (status, _) = admin_post(
        &env,
        "/_emulator/entitlement",
        json!({"product_code": PRODUCT, "entitlement": "not_entitled"}),
    )
    .await;
    assert_eq!(status, 200);
    let task = env.client("AKIDADMIN", "s", "us-east-1").await;
    assert_eq!(
        register(task).await,
        Err("CustomerNotEntitledException".to_owned())
    );
}

#[tokio::test]
async fn entitlement_failure_can_be_configured_at_start() {
    let mut config = EmulatorConfig::demo();
    config.products[0].entitlement = Entitlement::PlatformNotSupported;
    let env = start(config).await;
    let c = env.default_client().await;
    let e = register_call(&c, 1).send().await.expect_err("first");
    assert_eq!(code(&e), "PlatformNotSupportedException");
    register_call(&c, 1)
        .send()
        .await
        .expect("later calls succeed");
}

// ---------------------------------------------------------------- BatchMeterUsage

fn record(
    customer: Option<&str>,
    account: Option<&str>,
    dimension: &str,
    timestamp: i64,
    quantity: i32,
) -> UsageRecord {
    UsageRecord::builder()
        .set_customer_identifier(customer.map(str::to_owned))
        .set_customer_aws_account_id(account.map(str::to_owned))
        .dimension(dimension)
        .timestamp(DateTime::from_secs(timestamp))
        .quantity(quantity)
        .build()
        .expect("record")
}

#[tokio::test]
async fn batch_meter_usage_per_record_statuses() {
    let env = start(EmulatorConfig::demo()).await;
    let c = env.default_client().await;
    let t = T0 - 60;
    let records = vec![
        record(Some("cust-demo-1"), None, "requests", t, 5),
        record(Some("cust-demo-1"), None, "requests", t, 5),
        record(Some("cust-demo-1"), None, "requests", t - 30, 6),
        record(Some("cust-demo-unsubscribed"), None, "requests", t, 1),
        record(Some("cust-nobody"), None, "requests", t, 1),
        record(None, Some("111122223333"), "gigabytes", t, 2),
    ];
    let out = c
        .batch_meter_usage()
        .product_code(PRODUCT)
        .set_usage_records(Some(records))
        .send()
        .await
        .expect("batch");
    let statuses: Vec<_> = out.results().iter().map(|r| r.status().cloned()).collect();
    use UsageRecordResultStatus as S;
    assert_eq!(
        statuses,
        vec![
            Some(S::Success),
            Some(S::Success),
            Some(S::DuplicateRecord),
            Some(S::CustomerNotSubscribed),
            Some(S::CustomerNotSubscribed),
            Some(S::Success)
        ]
    );
    let results = out.results();
    assert_eq!(
        results[0].metering_record_id(),
        results[1].metering_record_id(),
        "identical records are idempotent"
    );
    assert!(results[0].metering_record_id().is_some());
    assert_eq!(
        results[3].usage_record().map(|r| r.customer_identifier()),
        Some("cust-demo-unsubscribed")
    );
    assert!(out.unprocessed_records().is_empty());
    let stored = env.emu.batch_records();
    assert_eq!(stored.len(), 2);
    assert_eq!(
        stored[1].customer_identifier.as_deref(),
        Some("cust-demo-1")
    );
    assert_eq!(
        stored[1].customer_aws_account_id.as_deref(),
        Some("111122223333")
    );
    // Retrying the same records (or a subset) is idempotent.
    let again = c
        .batch_meter_usage()
        .product_code(PRODUCT)
        .usage_records(record(Some("cust-demo-1"), None, "requests", t, 5))
        .send()
        .await
        .expect("retry");
    assert_eq!(
        again.results()[0].metering_record_id(),
        results[0].metering_record_id()
    );
    assert!(
        env.emu.records().is_empty(),
        "batch records are kept apart from MeterUsage records"
    );
}

/// BatchMeterUsage's window follows the newest SDK models: a record up to 24 hours old is
/// taken, one 24 hours old is not, the window is configurable (6 hours in the API model given
/// with the project), and the previous billing month closes at 06:00 UTC on the 1st.
#[tokio::test]
async fn batch_meter_usage_windows() {
    let one = |t: i64| record(Some("cust-demo-1"), None, "requests", t, 1);
    let send = |c: Client, t: i64| async move {
        c.batch_meter_usage()
            .product_code(PRODUCT)
            .usage_records(one(t))
            .send()
            .await
    };
    let env = start(EmulatorConfig::demo()).await;
    let c = env.default_client().await;
    send(c.clone(), T0 - 24 * 3600 + 60)
        .await
        .expect("23h59m old");
    let e = send(c.clone(), T0 - 24 * 3600).await.expect_err("24h old");
    assert_eq!(code(&e), "TimestampOutOfBoundsException");

    let mut config = EmulatorConfig::demo();
    config.batch_timestamp_max_age = Duration::from_secs(6 * 3600);
    let six = start(config).await;
    let c6 = six.default_client().await;
    send(c6.clone(), T0 - 6 * 3600 + 60)
        .await
        .expect("5h59m old");
    let e = send(c6, T0 - 6 * 3600).await.expect_err("6h old");
    assert_eq!(code(&e), "TimestampOutOfBoundsException");

    // 2027-02-01T00:00:00Z: February's first six hours still take January's records.
    let feb1 = 1_801_440_000;
    let month = start(EmulatorConfig::demo()).await;
    let cm = month.default_client().await;
    month
        .clock
        .set(meterd::clock::from_unix_seconds(feb1 + 5 * 3600));
    send(cm.clone(), feb1 - 3600)
        .await
        .expect("January in the grace");
    month
        .clock
        .set(meterd::clock::from_unix_seconds(feb1 + 6 * 3600));
    let e = send(cm.clone(), feb1 - 1800)
        .await
        .expect_err("January after the grace");
    assert_eq!(code(&e), "TimestampOutOfBoundsException");
    send(cm, feb1 + 3600).await.expect("February");
}

fn licensed(account: &str, license: &str, dimension: &str, t: i64, quantity: i32) -> UsageRecord {
    UsageRecord::builder()
        .customer_aws_account_id(account)
        .license_arn(license)
        .dimension(dimension)
        .timestamp(DateTime::from_secs(t))
        .quantity(quantity)
        .build()
        .expect("record")
}

/// Concurrent agreements: records name a LicenseArn instead of the request's ProductCode,
/// are deduplicated per (account, license, dimension, hour), and a license that is unknown,
/// another customer's, another product's or outside its activation period answers
/// InvalidLicenseException. ResolveCustomer returns the license and its agreement.
#[tokio::test]
async fn batch_meter_usage_by_license_arn() {
    let mut config = EmulatorConfig::demo();
    let other = "arn:aws:license-manager::111122223333:license:l-expired00000000000000000000002";
    let base = config.licenses[0].clone();
    config.licenses.push(LicenseConfig {
        arn: other.to_owned(),
        agreement_id: None,
        ends_at: Some(meterd::clock::from_unix_seconds(T0 - 7200)),
        ..base
    });
    let env = start(config).await;
    let c = env.default_client().await;
    let t = T0 - 60;

    let resolved = c
        .resolve_customer()
        .registration_token("demo-token-1")
        .send()
        .await
        .expect("resolve");
    assert_eq!(resolved.license_arn(), Some(DEMO_LICENSE_ARN));
    assert_eq!(
        resolved.metadata().and_then(|m| m.agreement_id()),
        Some("agmt-demo1234")
    );

    // No ProductCode: the license names the product.
    let out = c
        .batch_meter_usage()
        .usage_records(licensed("111122223333", DEMO_LICENSE_ARN, "requests", t, 4))
        .send()
        .await
        .expect("license-based batch");
    let first = out.results()[0]
        .metering_record_id()
        .expect("id")
        .to_owned();
    let stored = env.emu.batch_records();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].license_arn.as_deref(), Some(DEMO_LICENSE_ARN));
    assert_eq!(stored[0].product_code, PRODUCT);
    // The same record again: the same id; another quantity: a duplicate.
    let again = c
        .batch_meter_usage()
        .usage_records(licensed("111122223333", DEMO_LICENSE_ARN, "requests", t, 4))
        .send()
        .await
        .expect("retry");
    assert_eq!(
        again.results()[0].metering_record_id(),
        Some(first.as_str())
    );
    let dup = c
        .batch_meter_usage()
        .usage_records(licensed("111122223333", DEMO_LICENSE_ARN, "requests", t, 5))
        .send()
        .await
        .expect("duplicate");
    assert_eq!(
        dup.results()[0].status().map(|s| s.as_str()),
        Some("DuplicateRecord")
    );

    let invalid = [
        (
            "unknown license",
            licensed(
                "111122223333",
                "arn:aws:license-manager::111122223333:license:l-nope",
                "requests",
                t,
                1,
            ),
        ),
        (
            "another customer's",
            licensed("444455556666", DEMO_LICENSE_ARN, "requests", t, 1),
        ),
        ("expired", licensed("111122223333", other, "requests", t, 1)),
    ];
    for (name, rec) in invalid {
        let e = c
            .batch_meter_usage()
            .usage_records(rec)
            .send()
            .await
            .expect_err(name);
        assert_eq!(code(&e), "InvalidLicenseException", "{name}");
    }
    // A record without a license needs the ProductCode.
    let e = c
        .batch_meter_usage()
        .usage_records(record(None, Some("111122223333"), "requests", t, 1))
        .send()
        .await
        .expect_err("no product, no license");
    assert_eq!(code(&e), "ValidationException");
    // A malformed ARN fails the model's pattern, and the message names the pattern.
    let (status, body) = raw_call(
        &env,
        "BatchMeterUsage",
        &json!({"UsageRecords": [{"Timestamp": t, "Dimension": "requests",
            "CustomerAWSAccountId": "111122223333", "LicenseArn": "not-an-arn"}]}),
        Some(("AKIDTASK1", "secret")),
    )
    .await
    .expect("answer");
    assert_eq!(
        (status, body["__type"].as_str()),
        (400, Some("ValidationException"))
    );
    let message = body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("usageRecords.1.member.licenseArn")
            && message.contains("must satisfy regular expression pattern: ^arn:aws")
            && !message.contains("length"),
        "{message}"
    );
    assert!(env.emu.double_billed().is_empty());
}

/// The same customer, dimension and hour metered by ProductCode and by LicenseArn is billed
/// twice: AWS takes both, and the emulator lists the pair so a test can catch it.
#[tokio::test]
async fn metering_one_customer_hour_both_ways_is_double_billing() {
    let env = start(EmulatorConfig::demo()).await;
    let c = env.default_client().await;
    let t = T0 - 60;
    let by_product = c
        .batch_meter_usage()
        .product_code(PRODUCT)
        .usage_records(record(None, Some("111122223333"), "requests", t, 2))
        .send()
        .await
        .expect("by product");
    let by_license = c
        .batch_meter_usage()
        .usage_records(licensed(
            "111122223333",
            DEMO_LICENSE_ARN,
            "requests",
            t + 1,
            2,
        ))
        .send()
        .await
        .expect("by license");
    // Another dimension or hour is not a double charge.
    c.batch_meter_usage()
        .usage_records(licensed(
            "111122223333",
            DEMO_LICENSE_ARN,
            "gigabytes",
            t,
            1,
        ))
        .send()
        .await
        .expect("another dimension");
    let ids =
        |o: &aws_sdk_marketplacemetering::operation::batch_meter_usage::BatchMeterUsageOutput| {
            o.results()[0]
                .metering_record_id()
                .unwrap_or_default()
                .to_owned()
        };
    let doubles = env.emu.double_billed();
    assert_eq!(doubles.len(), 1, "{doubles:?}");
    assert_eq!(doubles[0].customer_aws_account_id, "111122223333");
    assert_eq!(doubles[0].dimension, "requests");
    assert_eq!(doubles[0].hour, hour_floor(t));
    assert_eq!(
        doubles[0].metering_record_ids,
        [ids(&by_product), ids(&by_license)]
    );
    assert_eq!(env.emu.batch_records().len(), 3);
}

#[tokio::test]
async fn batch_meter_usage_whole_batch_errors() {
    let env = start(EmulatorConfig::demo()).await;
    let c = env.default_client().await;
    let good = || record(Some("cust-demo-1"), None, "requests", T0, 1);
    let batch = |records: Vec<UsageRecord>| {
        c.batch_meter_usage()
            .product_code(PRODUCT)
            .set_usage_records(Some(records))
    };
    let tagged = UsageRecord::builder()
        .customer_identifier("cust-demo-1")
        .dimension("gigabytes")
        .timestamp(DateTime::from_secs(T0))
        .quantity(2)
        .usage_allocations(alloc(1, &[("bad?", "x")]))
        .usage_allocations(alloc(1, &[]))
        .build()
        .expect("record");
    let unsummed = UsageRecord::builder()
        .customer_identifier("cust-demo-1")
        .dimension("gigabytes")
        .timestamp(DateTime::from_secs(T0))
        .quantity(3)
        .usage_allocations(alloc(1, &[("a", "x")]))
        .build()
        .expect("record");
    let cases: Vec<(&str, Vec<UsageRecord>, &str)> = vec![
        (
            "26 records",
            (0..26).map(|_| good()).collect(),
            "ValidationException",
        ),
        (
            "both CustomerIdentifier and CustomerAWSAccountId",
            vec![
                good(),
                record(Some("cust-demo-1"), Some("111122223333"), "requests", T0, 1),
            ],
            "InvalidCustomerIdentifierException",
        ),
        (
            "neither customer member",
            vec![record(None, None, "requests", T0, 1)],
            "InvalidCustomerIdentifierException",
        ),
        (
            // The newest SDK models' window (botocore 1.44, JS v3): 24 hours.
            "one timestamp 24 hours old",
            vec![
                good(),
                record(Some("cust-demo-1"), None, "gigabytes", T0 - 24 * 3600, 1),
            ],
            "TimestampOutOfBoundsException",
        ),
        (
            "one timestamp in the future",
            vec![
                good(),
                record(Some("cust-demo-1"), None, "gigabytes", T0 + 3600, 1),
            ],
            "TimestampOutOfBoundsException",
        ),
        (
            "unknown dimension",
            vec![good(), record(Some("cust-demo-1"), None, "seats", T0, 1)],
            "InvalidUsageDimensionException",
        ),
        ("bad tag", vec![good(), tagged], "InvalidTagException"),
        (
            "allocations not summing",
            vec![good(), unsummed],
            "InvalidUsageAllocationsException",
        ),
    ];
    for (name, records, want) in cases {
        let e = batch(records).send().await.expect_err(name);
        assert_eq!(code(&e), want, "{name}");
    }
    let e = c
        .batch_meter_usage()
        .product_code("prod-unknown")
        .usage_records(good())
        .send()
        .await
        .expect_err("product");
    assert_eq!(code(&e), "InvalidProductCodeException");
    assert!(
        env.emu.batch_records().is_empty(),
        "a rejected batch stores nothing"
    );
    // 25 records is fine.
    let ok = batch((0..25).map(|_| good()).collect())
        .send()
        .await
        .expect("25 records");
    assert_eq!(ok.results().len(), 25);
    // The request must be smaller than 1 MB (unknown members are ignored but still count).
    let big =
        json!({"ProductCode": PRODUCT, "UsageRecords": [], "Padding": "x".repeat(1024 * 1024)});
    let answer = raw_call(&env, "BatchMeterUsage", &big, Some(("AKIDRAW", "s"))).await;
    assert_eq!(error_type(&answer), (400, "ValidationException".to_owned()));
    let small = json!({"ProductCode": PRODUCT, "UsageRecords": [], "Padding": "x".repeat(1000)});
    let answer = raw_call(&env, "BatchMeterUsage", &small, Some(("AKIDRAW", "s"))).await;
    assert_eq!(answer.map(|a| a.0), Some(200));
}

#[tokio::test]
async fn batch_meter_usage_unprocessed_records_under_fault_injection() {
    let env = start(EmulatorConfig::demo()).await;
    let c = env.default_client().await;
    let mut profile = FaultProfile::default();
    profile.operations.insert(
        Operation::BatchMeterUsage,
        FaultRule {
            unprocessed_rate: 1.0,
            ..FaultRule::default()
        },
    );
    env.emu.set_faults(profile);
    let out = c
        .batch_meter_usage()
        .product_code(PRODUCT)
        .usage_records(record(Some("cust-demo-1"), None, "requests", T0, 3))
        .usage_records(record(None, Some("111122223333"), "gigabytes", T0, 4))
        .send()
        .await
        .expect("batch answered");
    assert!(out.results().is_empty());
    assert_eq!(out.unprocessed_records().len(), 2);
    assert_eq!(
        out.unprocessed_records()[1].customer_aws_account_id(),
        Some("111122223333")
    );
    assert!(env.emu.batch_records().is_empty());
    assert_eq!(
        env.emu.calls().last().and_then(|c| c.fault),
        Some(InjectedFault::Unprocessed { records: 2 })
    );
    // Retrying the unprocessed records once the fault clears processes them.
    env.emu.set_faults(FaultProfile::default());
    let retry = c
        .batch_meter_usage()
        .product_code(PRODUCT)
        .set_usage_records(Some(out.unprocessed_records().to_vec()))
        .send()
        .await
        .expect("retry");
    assert_eq!(retry.results().len(), 2);
    assert_eq!(env.emu.batch_records().len(), 2);
}

// ---------------------------------------------------------------- ResolveCustomer

#[tokio::test]
async fn resolve_customer_tokens() {
    let mut config = EmulatorConfig::demo();
    config.customers.push(CustomerConfig {
        identifier: "cust-acme".into(),
        aws_account_id: "999988887777".into(),
        product_code: PRODUCT.into(),
        subscribed: true,
    });
    config.registration_tokens.push(RegistrationTokenConfig {
        token: "tok-expiring".into(),
        customer_identifier: "cust-acme".into(),
        expires_at: Some(meterd::clock::from_unix_seconds(T0 + 60)),
    });
    config.registration_tokens.push(RegistrationTokenConfig {
        token: "tok-expired".into(),
        customer_identifier: "cust-acme".into(),
        expires_at: Some(meterd::clock::from_unix_seconds(T0 - 1)),
    });
    let env = start(config).await;
    let c = env.default_client().await;
    let resolve = |token: &'static str| {
        let c = c.clone();
        async move {
            c.resolve_customer()
                .registration_token(token)
                .send()
                .await
                .map(|o| {
                    (
                        o.customer_identifier().unwrap_or_default().to_owned(),
                        o.customer_aws_account_id().unwrap_or_default().to_owned(),
                        o.product_code().unwrap_or_default().to_owned(),
                    )
                })
                .map_err(|e| code(&e))
        }
    };
    let acme = Ok((
        "cust-acme".to_owned(),
        "999988887777".to_owned(),
        PRODUCT.to_owned(),
    ));
    type Resolved = Result<(String, String, String), String>;
    let cases: Vec<(&str, &'static str, Resolved)> = vec![
        ("configured token", "tok-expiring", acme.clone()),
        (
            "the same token again",
            "tok-expiring",
            Err("ExpiredTokenException".into()),
        ),
        (
            "a token past its expiry",
            "tok-expired",
            Err("ExpiredTokenException".into()),
        ),
        (
            "an unknown token",
            "tok-nobody",
            Err("InvalidTokenException".into()),
        ),
        (
            "the demo token",
            "demo-token-1",
            Ok(("cust-demo-1".into(), "111122223333".into(), PRODUCT.into())),
        ),
    ];
    for (name, token, want) in cases {
        assert_eq!(resolve(token).await, want, "{name}");
    }
    // Expiry follows the emulator clock.
    let (status, _) = admin_post(&env, "/_emulator/registration-tokens", json!({"token": "tok-late", "customer_identifier": "cust-acme", "expires_at": "2027-01-15T09:00:00Z"})).await;
    assert_eq!(status, 201);
    env.clock.advance(Duration::from_secs(3600));
    assert_eq!(
        resolve("tok-late").await,
        Err("ExpiredTokenException".into())
    );
    assert_eq!(
        resolve("demo-token-2").await.map(|r| r.0),
        Ok("cust-demo-1".into())
    );
}

// ---------------------------------------------------------------- SigV4

#[tokio::test]
async fn sigv4_with_configured_credentials() {
    let mut config = EmulatorConfig::demo();
    config.credentials = BTreeMap::from([("AKIDGOOD".to_owned(), "right-secret".to_owned())]);
    let env = start(config).await;
    let register = |c: Client| async move {
        register_call(&c, 1)
            .nonce("x")
            .send()
            .await
            .map(|_| ())
            .map_err(|e| {
                let f = CallFailure::from_sdk(&e);
                (f.code.unwrap_or_default(), f.status.unwrap_or_default())
            })
    };
    assert_eq!(
        register(env.client("AKIDGOOD", "right-secret", "us-east-1").await).await,
        Ok(())
    );
    assert_eq!(
        register(env.client("AKIDGOOD", "wrong-secret", "us-east-1").await).await,
        Err(("InvalidSignatureException".to_owned(), 400))
    );
    assert_eq!(
        register(env.client("AKIDUNKNOWN", "right-secret", "us-east-1").await).await,
        Err(("UnrecognizedClientException".to_owned(), 400))
    );
    let c = env.client("AKIDGOOD", "wrong-secret", "us-east-1").await;
    let e = meter(&c, "requests", T0, 1, None).await;
    assert_eq!(e, Err("InvalidSignatureException".into()));
    assert!(
        env.emu.records().is_empty(),
        "an unauthenticated call stores nothing"
    );

    let body = json!({"ProductCode": PRODUCT, "PublicKeyVersion": 1});
    assert_eq!(
        error_type(&raw_call(&env, "RegisterUsage", &body, None).await),
        (400, "MissingAuthenticationTokenException".to_owned())
    );
    assert_eq!(
        raw_call(
            &env,
            "RegisterUsage",
            &body,
            Some(("AKIDGOOD", "right-secret"))
        )
        .await
        .map(|a| a.0),
        Some(200)
    );
    assert_eq!(
        error_type(&raw_call(&env, "RegisterUsage", &body, Some(("AKIDGOOD", "nope"))).await),
        (400, "InvalidSignatureException".to_owned())
    );
}

#[tokio::test]
async fn without_credentials_any_well_formed_signature_is_accepted_but_one_is_required() {
    let env = start(EmulatorConfig::demo()).await;
    let body = json!({"ProductCode": PRODUCT, "PublicKeyVersion": 1});
    assert_eq!(
        raw_call(&env, "RegisterUsage", &body, Some(("ANYKEY", "any-secret")))
            .await
            .map(|a| a.0),
        Some(200)
    );
    assert_eq!(
        error_type(&raw_call(&env, "RegisterUsage", &body, None).await),
        (400, "MissingAuthenticationTokenException".to_owned())
    );
    let calls = env.emu.calls();
    assert_eq!(calls[0].identity.as_deref(), Some("ANYKEY"));
    assert_eq!(calls[0].operation, "RegisterUsage");
    assert_eq!(
        calls[1].error_type(),
        Some("MissingAuthenticationTokenException")
    );
}

#[tokio::test]
async fn a_non_ascii_amz_date_answers_incomplete_signature_and_the_emulator_lives_on() {
    let mut config = EmulatorConfig::demo();
    config.credentials = BTreeMap::from([("AKIDGOOD".to_owned(), "right-secret".to_owned())]);
    let env = start(config).await;
    let body = json!({"ProductCode": PRODUCT, "PublicKeyVersion": 1}).to_string();
    let mut headers = http::HeaderMap::new();
    headers.insert("host", env.emu.addr().to_string().parse().expect("host"));
    headers.insert(
        "x-amz-target",
        "AWSMPMeteringService.RegisterUsage"
            .parse()
            .expect("target"),
    );
    Signer {
        access_key_id: "AKIDGOOD",
        secret: "right-secret",
        region: "us-east-1",
    }
    .sign(&mut headers, "POST", "/", body.as_bytes(), env.clock.now());
    headers.insert(
        "x-amz-date",
        http::HeaderValue::from_bytes(b"202\xc3\xa9010T120000Z").expect("obs-text"),
    );
    let answer = http(env.emu.addr(), "POST", "/", headers, body.into_bytes()).await;
    assert_eq!(
        error_type(&answer),
        (400, "IncompleteSignatureException".to_owned())
    );
    let c = env.client("AKIDGOOD", "right-secret", "us-east-1").await;
    register_call(&c, 1).send().await.expect("still serving");
}

#[test]
fn offline_calls_take_the_served_path() {
    let clock = ManualClock::at_unix(T0);
    let emu = emulator::Offline::new(EmulatorConfig::demo(), clock.clone()).expect("builds");
    let body = json!({
        "ProductCode": PRODUCT, "Timestamp": T0, "UsageDimension": "requests", "UsageQuantity": 3
    })
    .to_string();
    let mut headers = http::HeaderMap::new();
    headers.insert("host", "emulator".parse().expect("host"));
    headers.insert(
        "x-amz-target",
        "AWSMPMeteringService.MeterUsage".parse().expect("target"),
    );
    Signer {
        access_key_id: "AKIDTASK1",
        secret: "any",
        region: "us-east-1",
    }
    .sign(&mut headers, "POST", "/", body.as_bytes(), clock.now());
    let list: Vec<(&[u8], &[u8])> = headers
        .iter()
        .map(|(k, v)| (k.as_str().as_bytes(), v.as_bytes()))
        .collect();
    let answer = emu
        .call(b"POST", b"/", &list, body.as_bytes())
        .expect("valid HTTP")
        .expect("answered");
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(emu.records().len(), 1);

    // A latency is recorded, not waited for; the admin API answers too.
    let faults = br#"{"all": {"latency": "1h"}}"#;
    let answer = emu
        .call(b"POST", b"/_emulator/faults", &[], faults)
        .expect("valid HTTP")
        .expect("answered");
    assert_eq!(answer.status, 200);
    let again = emu
        .call(b"POST", b"/", &list, body.as_bytes())
        .expect("valid HTTP")
        .expect("answered");
    assert_eq!(again.status, 200, "the same record again");
    let calls = emu
        .call(b"GET", b"/_emulator/calls", &[], b"")
        .expect("valid HTTP")
        .expect("answered");
    let calls: Value = serde_json::from_slice(&calls.body).expect("json");
    assert_eq!(calls[1]["added_latency_ms"], 3_600_000, "{calls}");

    let date: &[u8] = b"202\xc3\xa9010T120000Z";
    let mut odd = list.clone();
    odd.retain(|(k, _)| *k != b"x-amz-date");
    odd.push((b"x-amz-date", date));
    let answer = emu
        .call(b"POST", b"/", &odd, body.as_bytes())
        .expect("valid HTTP")
        .expect("answered");
    assert_eq!(answer.status, 400);
    assert!(emu
        .call(b"POST", b"/", &[(b"bad name", b"x")], b"")
        .is_err());
}

// ---------------------------------------------------------------- Faults

/// Sends `n` MeterUsage calls, each as its own task (identity), for distinct records.
async fn meter_many(env: &Env, n: usize, prefix: &str) -> Vec<Option<(u16, Value)>> {
    let mut answers = Vec::with_capacity(n);
    for i in 0..n {
        let body = json!({"ProductCode": PRODUCT, "UsageDimension": "requests", "Timestamp": T0, "UsageQuantity": i});
        answers.push(
            raw_call(
                env,
                "MeterUsage",
                &body,
                Some((&format!("{prefix}{i}"), "s")),
            )
            .await,
        );
    }
    answers
}

/// The response `Date` is the emulator's clock, not the wall clock: SDKs correct their skew
/// from it. The test clock stands at T0, years from the wall clock.
#[tokio::test]
async fn the_date_header_is_the_emulator_clock() {
    let env = start(EmulatorConfig::demo()).await;
    for path in ["/", "/_emulator/records"] {
        let stream = tokio::net::TcpStream::connect(env.emu.addr())
            .await
            .expect("connect");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let method = if path == "/" { "POST" } else { "GET" };
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", env.emu.addr().to_string())
            .header("x-amz-target", "AWSMPMeteringService.MeterUsage")
            .header("content-type", "application/x-amz-json-1.1")
            .body(Full::new(Bytes::from_static(b"{}")))
            .expect("request");
        let resp = sender.send_request(req).await.expect("response");
        let date = resp
            .headers()
            .get(http::header::DATE)
            .expect("a Date header");
        let date = httpdate::parse_http_date(date.to_str().expect("ascii")).expect("an HTTP date");
        assert_eq!(meterd::clock::unix_seconds(date), T0, "{path}");
    }
}

/// ClientToken reuse compares what the request means, not its bytes: the same report with
/// tags and allocations in another order, `UsageQuantity: 0` against none, `DryRun: false`
/// against none, gets the first MeteringRecordId; another quantity is a conflict.
#[tokio::test]
async fn client_token_reuse_compares_meaning_not_bytes() {
    let env = start(EmulatorConfig::demo()).await;
    let key = Some(("AKIDTOKEN1", "s"));
    let call = |body: Value| {
        let env = &env;
        async move { raw_call(env, "MeterUsage", &body, key).await }
    };
    let base = |token: &str| {
        json!({"ProductCode": PRODUCT, "UsageDimension": "requests",
        "Timestamp": T0, "ClientToken": token})
    };
    let with = |token: &str, extra: Value| {
        let mut b = base(token);
        if let (Some(o), Some(e)) = (b.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        b
    };
    let id = |answer: Option<(u16, Value)>| {
        let (status, body) = answer.expect("answer");
        assert_eq!(status, 200, "{body}");
        body["MeteringRecordId"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    let zero = id(call(base("tok-zero")).await);
    assert_eq!(
        zero,
        id(call(with("tok-zero", json!({"UsageQuantity": 0}))).await)
    );
    assert_eq!(
        zero,
        id(call(with("tok-zero", json!({"DryRun": false}))).await)
    );

    let a = json!({"AllocatedUsageQuantity": 1, "Tags": [{"Key": "t", "Value": "a"}, {"Key": "u", "Value": "1"}]});
    let a_swapped = json!({"Tags": [{"Key": "u", "Value": "1"}, {"Key": "t", "Value": "a"}], "AllocatedUsageQuantity": 1});
    let b = json!({"AllocatedUsageQuantity": 2, "Tags": [{"Key": "t", "Value": "b"}]});
    let hour = T0 - 3600;
    let first = id(call(with(
        "tok-alloc",
        json!({"Timestamp": hour, "UsageDimension": "gigabytes",
        "UsageQuantity": 3, "UsageAllocations": [a.clone(), b.clone()]}),
    ))
    .await);
    let reordered = id(call(with(
        "tok-alloc",
        json!({"Timestamp": hour, "UsageDimension": "gigabytes",
        "UsageQuantity": 3, "UsageAllocations": [b, a_swapped]}),
    ))
    .await);
    assert_eq!(first, reordered);

    let (status, body) = call(with("tok-zero", json!({"UsageQuantity": 1})))
        .await
        .expect("answer");
    assert_eq!(
        (status, body["__type"].as_str()),
        (400, Some("IdempotencyConflictException"))
    );
    assert_eq!(env.emu.records().len(), 2);
}

/// The newest model's decimal quantities (`…AsDecimal`): stored with their value, compared
/// by value (17, "17.0" and "17.00" are one quantity), never mixed with an integer one.
#[tokio::test]
async fn decimal_quantities_are_served_and_compared_by_value() {
    let env = start(EmulatorConfig::demo()).await;
    let key = Some(("AKIDDECIMAL1", "s"));
    let meter = |extra: Value| {
        let env = &env;
        async move {
            let mut body =
                json!({"ProductCode": PRODUCT, "UsageDimension": "requests", "Timestamp": T0});
            if let (Some(o), Some(e)) = (body.as_object_mut(), extra.as_object()) {
                o.extend(e.clone());
            }
            raw_call(env, "MeterUsage", &body, key)
                .await
                .expect("answer")
        }
    };
    let (status, first) = meter(json!({"UsageQuantityAsDecimal": "17.420"})).await;
    assert_eq!(status, 200, "{first}");
    let stored = env.emu.records();
    assert_eq!(stored.len(), 1);
    assert_eq!(
        (stored[0].quantity, stored[0].quantity_as_decimal.as_deref()),
        (17, Some("17.42"))
    );
    let (status, again) = meter(json!({"UsageQuantityAsDecimal": "17.42"})).await;
    assert_eq!(
        (status, &again["MeteringRecordId"]),
        (200, &first["MeteringRecordId"])
    );
    let (status, other) = meter(json!({"UsageQuantityAsDecimal": "17.43"})).await;
    assert_eq!(
        (status, other["__type"].as_str()),
        (400, Some("DuplicateRequestException"))
    );

    let refused = [
        (
            json!({"UsageQuantity": 1, "UsageQuantityAsDecimal": "1"}),
            "ValidationException",
        ),
        (
            json!({"UsageQuantityAsDecimal": "017"}),
            "ValidationException",
        ),
        (
            json!({"UsageQuantityAsDecimal": "2", "UsageAllocations": [
            {"AllocatedUsageQuantity": 2, "Tags": [{"Key": "t", "Value": "a"}]}]}),
            "InvalidUsageAllocationsException",
        ),
        (
            json!({"UsageQuantityAsDecimal": "2.5", "UsageAllocations": [
            {"AllocatedUsageQuantityAsDecimal": "2.4", "Tags": [{"Key": "t", "Value": "a"}]}]}),
            "InvalidUsageAllocationsException",
        ),
    ];
    for (mut extra, want) in refused {
        extra["UsageDimension"] = json!("gigabytes");
        let (status, body) = meter(extra).await;
        assert_eq!(
            (status, body["__type"].as_str()),
            (400, Some(want)),
            "{body}"
        );
    }
    let (status, body) = meter(
        json!({"UsageDimension": "gigabytes", "UsageQuantityAsDecimal": "2.5",
        "UsageAllocations": [
            {"AllocatedUsageQuantityAsDecimal": "2.25", "Tags": [{"Key": "t", "Value": "a"}]},
            {"AllocatedUsageQuantityAsDecimal": "0.25", "Tags": [{"Key": "t", "Value": "b"}]}]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    // BatchMeterUsage: Quantity 3 and QuantityAsDecimal "3.00" are the same record.
    let batch = |q: Value| {
        let env = &env;
        async move {
            let mut rec = json!({"Timestamp": T0, "Dimension": "requests", "CustomerIdentifier": "cust-demo-1"});
            if let (Some(o), Some(e)) = (rec.as_object_mut(), q.as_object()) {
                o.extend(e.clone());
            }
            let body = json!({"ProductCode": PRODUCT, "UsageRecords": [rec]});
            raw_call(env, "BatchMeterUsage", &body, key)
                .await
                .expect("answer")
        }
    };
    let (_, a) = batch(json!({"Quantity": 3})).await;
    let (_, b) = batch(json!({"QuantityAsDecimal": "3.00"})).await;
    assert_eq!(a["Results"][0]["Status"], "Success", "{a}");
    assert_eq!(
        a["Results"][0]["MeteringRecordId"], b["Results"][0]["MeteringRecordId"],
        "{b}"
    );
    let (_, c) = batch(json!({"QuantityAsDecimal": "3.5"})).await;
    assert_eq!(c["Results"][0]["Status"], "DuplicateRecord", "{c}");
}

/// MeteringRecordIds are random unless a seed is given: two fresh emulators never repeat each
/// other's ids (a client storing them as unique keys survives a restart), two seeded ones do.
#[tokio::test]
async fn record_ids_are_random_unless_a_seed_is_given() {
    async fn ids(seed: Option<u64>) -> Vec<String> {
        let mut config = EmulatorConfig::demo();
        config.seed = seed;
        let env = start(config).await;
        meter_many(&env, 5, "AKIDIDS").await;
        env.emu
            .records()
            .into_iter()
            .map(|r| r.metering_record_id)
            .collect()
    }
    let (a, b) = (ids(None).await, ids(None).await);
    assert_eq!((a.len(), b.len()), (5, 5));
    assert!(
        a.iter().all(|id| !b.contains(id)),
        "{a:?} and {b:?} share ids"
    );
    assert_eq!(ids(Some(42)).await, ids(Some(42)).await);
}

#[tokio::test]
async fn seeded_fault_rates_and_faulted_calls_store_nothing() {
    let mut config = EmulatorConfig::demo();
    config.seed = Some(1234);
    config.faults.all = FaultRule {
        throttle_rate: 0.2,
        error_rate: 0.1,
        drop_rate: 0.05,
        ..FaultRule::default()
    };
    let env = start(config).await;
    let n = 400;
    let answers = meter_many(&env, n, "AKIDF").await;

    let (mut throttled, mut errors, mut dropped, mut ok) = (0, 0, 0, 0);
    for a in &answers {
        match a {
            None => dropped += 1,
            Some((200, _)) => ok += 1,
            Some((400, b)) if b["__type"] == "ThrottlingException" => throttled += 1,
            Some((500, b)) if b["__type"] == "InternalServiceErrorException" => errors += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    // Within 5 standard deviations of n·p.
    let within = |count: usize, p: f64| {
        let mean = n as f64 * p;
        let sd = (n as f64 * p * (1.0 - p)).sqrt();
        (count as f64 - mean).abs() <= 5.0 * sd
    };
    assert!(within(throttled, 0.2), "throttled {throttled}");
    assert!(within(errors, 0.1), "errors {errors}");
    assert!(within(dropped, 0.05), "dropped {dropped}");
    assert!(throttled > 0 && errors > 0 && dropped > 0);

    // Only the calls that succeeded left records, one each.
    let records = env.emu.records();
    assert_eq!(records.len(), ok);
    let calls = env.emu.calls();
    assert_eq!(calls.len(), n);
    for (call, answer) in calls.iter().zip(&answers) {
        let stored = records
            .iter()
            .any(|r| Some(&r.identity) == call.identity.as_ref());
        assert_eq!(stored, call.fault.is_none(), "{call:?}");
        match call.fault {
            Some(InjectedFault::Dropped) => assert_eq!(call.outcome, Outcome::Dropped),
            Some(InjectedFault::Throttled) => {
                assert_eq!(call.error_type(), Some("ThrottlingException"))
            }
            Some(InjectedFault::ServerError) => assert_eq!(answer.as_ref().map(|a| a.0), Some(500)),
            None => assert_eq!(call.outcome, Outcome::Ok),
            other => panic!("unexpected fault {other:?}"),
        }
    }

    // The same seed reproduces the same faults.
    let mut config = EmulatorConfig::demo();
    config.seed = Some(1234);
    config.faults.all = FaultRule {
        throttle_rate: 0.2,
        error_rate: 0.1,
        drop_rate: 0.05,
        ..FaultRule::default()
    };
    let twin = start(config).await;
    meter_many(&twin, 100, "AKIDF").await;
    let faults = |calls: &[meterd::emulator::CallRecord]| {
        calls.iter().take(100).map(|c| c.fault).collect::<Vec<_>>()
    };
    assert_eq!(faults(&twin.emu.calls()), faults(&calls));
}

#[tokio::test]
async fn sdk_sees_injected_faults_as_aws_errors() {
    let env = start(EmulatorConfig::demo()).await;
    let c = env.default_client().await;
    let only = |rule: FaultRule| {
        let mut p = FaultProfile::default();
        p.operations.insert(Operation::MeterUsage, rule);
        p
    };
    let cases: [(FaultRule, Option<&str>, Option<u16>); 3] = [
        (
            FaultRule {
                throttle_rate: 1.0,
                ..FaultRule::default()
            },
            Some("ThrottlingException"),
            Some(400),
        ),
        (
            FaultRule {
                error_rate: 1.0,
                ..FaultRule::default()
            },
            Some("InternalServiceErrorException"),
            Some(500),
        ),
        (
            FaultRule {
                drop_rate: 1.0,
                ..FaultRule::default()
            },
            None,
            None,
        ),
    ];
    for (rule, want_code, want_status) in cases {
        env.emu.set_faults(only(rule));
        let e = meter_call(&c, "requests", T0)
            .send()
            .await
            .expect_err("faulted");
        let f = CallFailure::from_sdk(&e);
        assert_eq!(
            (f.code.as_deref(), f.status),
            (want_code, want_status),
            "{f:?}"
        );
        assert!(f.is_retryable());
    }
    // Other operations are unaffected by a MeterUsage-only rule.
    register_call(&c, 1).send().await.expect("unaffected");
    assert!(env.emu.records().is_empty());
}

#[tokio::test]
async fn down_for_follows_the_emulator_clock_and_admin_api_sets_faults() {
    let env = start(EmulatorConfig::demo()).await;
    let c = env.default_client().await;
    let (status, _) = admin_post(
        &env,
        "/_emulator/faults",
        json!({"operations": {"MeterUsage": {"down_for": "60s"}}}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        admin_get(&env, "/_emulator/faults").await["operations"]["MeterUsage"]["down_for"],
        "1m"
    );
    let e = meter_call(&c, "requests", T0)
        .send()
        .await
        .expect_err("down");
    let f = CallFailure::from_sdk(&e);
    assert_eq!(
        (f.code.as_deref(), f.status),
        (Some("ServiceUnavailable"), Some(503))
    );
    register_call(&c, 1)
        .send()
        .await
        .expect("other operations are up");
    env.clock.advance(Duration::from_secs(59));
    assert!(meter(&c, "requests", T0, 1, None).await.is_err());
    env.clock.advance(Duration::from_secs(1));
    assert!(
        meter(&c, "requests", T0, 1, None).await.is_ok(),
        "back up after 60 s of emulator time"
    );
    assert_eq!(env.emu.records().len(), 1);

    let (status, body) = admin_post(
        &env,
        "/_emulator/faults",
        json!({"all": {"throttle_rate": 2.0}}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = admin_post(
        &env,
        "/_emulator/faults",
        json!({"all": {"throtle_rate": 0.5}}),
    )
    .await;
    assert_eq!(status, 400, "unknown fields are rejected");
}

#[tokio::test]
async fn fault_durations_past_the_bound_are_400s_naming_the_field() {
    let env = start(EmulatorConfig::demo()).await;
    for (body, field) in [
        (
            json!({"all": {"down_for": "500000000000years"}}),
            "faults.all.down_for: at most 7days",
        ),
        (
            json!({"operations": {"MeterUsage": {"latency": "500000000000years"}}}),
            "faults.operations.MeterUsage.latency: at most 7days",
        ),
    ] {
        let (status, answer) = admin_post(&env, "/_emulator/faults", body.clone()).await;
        assert_eq!(status, 400, "{answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(error.starts_with(field), "{error}");
        let profile: FaultProfile = serde_json::from_value(body).expect("a profile");
        let err = env.emu.try_set_faults(profile).expect_err("the same check");
        assert_eq!(err.problems.join("; "), error);
    }
    assert_eq!(
        admin_get(&env, "/_emulator/faults").await,
        json!({"all": serde_json::to_value(FaultRule::default()).expect("json"), "operations": {}}),
        "a refused profile changes nothing"
    );
    let c = env.default_client().await;
    assert!(meter(&c, "requests", T0, 1, None).await.is_ok());
}

#[tokio::test]
#[should_panic(expected = "faults.all.latency: at most 7days")]
async fn set_faults_refuses_an_invalid_profile_loudly() {
    let env = start(EmulatorConfig::demo()).await;
    let mut profile = FaultProfile::default();
    profile.all.latency = Some(Duration::from_secs(8 * 24 * 3600));
    env.emu.set_faults(profile);
}

#[tokio::test]
async fn latency_is_emulator_clock_time() {
    let env = start(EmulatorConfig::demo()).await;
    let c = env.default_client().await;
    let mut profile = FaultProfile::default();
    profile.all.latency = Some(Duration::from_secs(10));
    env.emu.set_faults(profile);
    let call = tokio::spawn(async move { meter(&c, "requests", T0, 1, None).await });
    let mut advanced = 0;
    let mut call = std::pin::pin!(call);
    let answer = loop {
        assert!(advanced < 200, "the call never finished");
        if let Ok(done) = tokio::time::timeout(Duration::from_millis(50), &mut call).await {
            break done.expect("task");
        }
        env.clock.advance(Duration::from_secs(1));
        advanced += 1;
    };
    assert!(answer.is_ok(), "{answer:?}");
    assert!(
        advanced >= 10,
        "answered after only {advanced} s of emulator time"
    );
    assert_eq!(env.emu.calls()[0].added_latency_ms, 10_000);
}

// ---------------------------------------------------------------- Admin

#[tokio::test]
async fn admin_endpoints_report_records_calls_and_keys() {
    let env = start(EmulatorConfig::demo()).await;
    let c = env.default_client().await;
    let id = meter(
        &c,
        "requests",
        T0,
        3,
        Some(vec![alloc(3, &[("team", "a")])]),
    )
    .await
    .expect("metered");
    let _ = meter(&c, "requests", T0, 4, None).await;

    let records = admin_get(&env, "/_emulator/records").await;
    assert_eq!(records.as_array().map(Vec::len), Some(1));
    assert_eq!(records[0]["metering_record_id"], id.as_str());
    assert_eq!(records[0]["identity"], "AKIDTASK1");
    assert_eq!(records[0]["hour"], hour_floor(T0));
    assert_eq!(records[0]["allocations"][0]["tags"][0]["key"], "team");

    let calls = admin_get(&env, "/_emulator/calls").await;
    assert_eq!(
        calls[1]["outcome"],
        json!({"kind": "error", "error_type": "DuplicateRequestException", "status": 400})
    );
    assert_eq!(calls[0]["time_ms"], T0 * 1000);

    let keys = admin_get(&env, "/_emulator/public-keys").await;
    assert_eq!(keys[0]["version"], 1);
    assert_eq!(
        keys[0]["pem"].as_str(),
        env.emu.public_key_pem(1).as_deref()
    );
    assert_eq!(admin_get(&env, "/_emulator/health").await["status"], "ok");
    assert_eq!(admin_get(&env, "/_emulator/batch-records").await, json!([]));
    env.emu.shutdown().await;
}

/// The emulator knows each product's pricing model: an hourly listing has no dimensions, so
/// MeterUsage (DryRun or not) is the wrong route and answers as AWS does, while RegisterUsage
/// works; the call log shows which calls were made.
#[tokio::test]
async fn an_hourly_product_registers_and_refuses_meter_usage() {
    use meterd::emulator::config::{ProductConfig, ProductPricing};
    let mut config = EmulatorConfig::demo();
    config.products.push(ProductConfig {
        code: "prod-hourly0001".to_owned(),
        pricing: ProductPricing::Hourly,
        dimensions: Vec::new(),
        entitlement: Entitlement::Entitled,
    });
    config
        .validate()
        .expect("an hourly product with no dimensions is valid");
    let env = start(config.clone()).await;
    let c = env.default_client().await;
    let registered = c
        .register_usage()
        .product_code("prod-hourly0001")
        .public_key_version(1)
        .nonce("n-1")
        .send()
        .await
        .expect("RegisterUsage works for an hourly product");
    assert!(registered.signature().is_some_and(|s| !s.is_empty()));
    for dry_run in [true, false] {
        let e = c
            .meter_usage()
            .product_code("prod-hourly0001")
            .usage_dimension("pod_hours")
            .timestamp(DateTime::from_secs(T0))
            .usage_quantity(1)
            .dry_run(dry_run)
            .send()
            .await
            .expect_err("no custom dimension");
        assert_eq!(code(&e), "InvalidUsageDimensionException");
    }
    let ops: Vec<String> = env
        .emu
        .calls()
        .iter()
        .map(|c| c.operation.clone())
        .collect();
    assert_eq!(ops, ["RegisterUsage", "MeterUsage", "MeterUsage"]);
    assert!(env.emu.records().is_empty());
    // An hourly product that lists dimensions is a configuration error.
    let mut bad = config;
    if let Some(p) = bad.products.last_mut() {
        p.dimensions = vec!["pod_hours".to_owned()];
    }
    let err = bad.validate().expect_err("hourly with dimensions");
    assert!(err.to_string().contains("priced hourly"), "{err}");
}

// ---------------------------------------------------------------- temporary credentials

const ROLE: &str = "arn:aws:iam::123456789012:role/meterd";

/// An unsigned web identity token (the emulator reads its claims only).
fn web_identity_token(claims: Value) -> String {
    use base64::Engine;
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    format!("{}.{}.c2ln", b64(&json!({"alg": "RS256"})), b64(&claims))
}

fn pod_token(uid: &str) -> String {
    web_identity_token(json!({
        "sub": "system:serviceaccount:billing:meterd",
        "aud": ["sts.amazonaws.com"],
        "iss": "https://oidc.example",
        "exp": T0 + 86_400,
        "kubernetes.io": {"pod": {"name": "meterd-0", "uid": uid}},
    }))
}

/// The text of the first `<tag>` in `xml`.
fn xml_text(xml: &str, tag: &str) -> Option<String> {
    let (_, rest) = xml.split_once(&format!("<{tag}>"))?;
    let (text, _) = rest.split_once(&format!("</{tag}>"))?;
    Some(text.to_owned())
}

/// A form-encoded STS call, signed with `key` (id, secret, session token) when given.
async fn sts_call(
    env: &Env,
    form: &[(&str, &str)],
    key: Option<(&str, &str, Option<&str>)>,
) -> (u16, String) {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    let body = form
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
        .into_bytes();
    let mut headers = http::HeaderMap::new();
    headers.insert("host", env.emu.addr().to_string().parse().expect("host"));
    headers.insert(
        "content-type",
        "application/x-www-form-urlencoded; charset=utf-8"
            .parse()
            .expect("ct"),
    );
    if let Some((id, secret, token)) = key {
        Signer {
            access_key_id: id,
            secret,
            region: "us-east-1",
        }
        .sign_scoped(
            &mut headers,
            "POST",
            "/",
            &body,
            env.clock.now(),
            "sts",
            token,
        );
    }
    let (status, bytes) = http_bytes(env.emu.addr(), "POST", "/", headers, body)
        .await
        .expect("STS answers");
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

struct TempCreds {
    key: String,
    secret: String,
    token: String,
}

async fn assume_role(env: &Env, session_name: &str, token: &str) -> TempCreds {
    let (status, xml) = sts_call(
        env,
        &[
            ("Action", "AssumeRoleWithWebIdentity"),
            ("Version", "2011-06-15"),
            ("RoleArn", ROLE),
            ("RoleSessionName", session_name),
            ("WebIdentityToken", token),
        ],
        None,
    )
    .await;
    assert_eq!(status, 200, "{xml}");
    TempCreds {
        key: xml_text(&xml, "AccessKeyId").expect("AccessKeyId"),
        secret: xml_text(&xml, "SecretAccessKey").expect("SecretAccessKey"),
        token: xml_text(&xml, "SessionToken").expect("SessionToken"),
    }
}

/// A Metering Service client signing with temporary credentials.
fn temp_client(env: &Env, creds: &TempCreds, token: Option<&str>) -> Client {
    let conf = aws_sdk_marketplacemetering::Config::builder()
        .behavior_version(aws_sdk_marketplacemetering::config::BehaviorVersion::latest())
        .region(aws_sdk_marketplacemetering::config::Region::new(
            "us-east-1",
        ))
        .endpoint_url(env.emu.endpoint_url())
        .retry_config(aws_sdk_marketplacemetering::config::retry::RetryConfig::disabled())
        .credentials_provider(aws_sdk_marketplacemetering::config::Credentials::new(
            creds.key.clone(),
            creds.secret.clone(),
            token.map(str::to_owned),
            None,
            "test",
        ))
        .build();
    Client::from_conf(conf)
}

fn creds_config() -> EmulatorConfig {
    let mut config = EmulatorConfig::demo();
    config.credentials = BTreeMap::from([("AKIDGOOD".to_owned(), "right-secret".to_owned())]);
    config
        .quotas
        .accounts
        .insert("AKIDGOOD".to_owned(), "444455556666".to_owned());
    config.temporary_credentials.tasks = vec![meterd::emulator::credentials::ContainerTask {
        id: "task-1".to_owned(),
        role_arn: ROLE.to_owned(),
        authorization_token: "task-1-token".to_owned(),
    }];
    config
}

/// A fleet on temporary credentials shares its role account's quota: the pods' rotating
/// keys are one buyer account to the service, not one account per key.
#[tokio::test]
async fn temporary_credentials_count_against_their_roles_account_quota() {
    let mut config = creds_config();
    config.quotas = meterd::emulator::quotas::QuotaConfig::default();
    let env = start(config).await;
    let hour = hour_floor(T0) - 3600;
    let mut answers = Vec::new();
    for pod in 0..12 {
        let creds = assume_role(&env, "fleet", &pod_token(&format!("pod-{pod}"))).await;
        let c = temp_client(&env, &creds, Some(&creds.token));
        answers.push(meter(&c, "requests", hour, 1, None).await);
    }
    let throttled = answers
        .iter()
        .filter(|a| a.as_ref().err().map(String::as_str) == Some("ThrottlingException"))
        .count();
    assert_eq!(
        (answers.len() - throttled, throttled),
        (10, 2),
        "{answers:?}"
    );
    let rates = env.emu.rates();
    let meter_rates = &rates["123456789012"]["MeterUsage"];
    assert_eq!((meter_rates.accepted, meter_rates.throttled), (10, 2));
}

#[tokio::test]
async fn web_identity_credentials_are_checked_and_keyed_on_the_pod_across_rotation() {
    let env = start(creds_config()).await;
    let hour = hour_floor(T0) - 3600;
    let first = assume_role(&env, "web-identity-token-1", &pod_token("pod-uid-1")).await;
    assert!(first.key.starts_with("ASIA"), "{}", first.key);
    let c1 = temp_client(&env, &first, Some(&first.token));
    let id = meter(&c1, "requests", hour, 7, None)
        .await
        .expect("temporary credentials are accepted");

    // Rotation: new keys for the same pod, under another session name. Still one instance.
    let second = assume_role(&env, "web-identity-token-2", &pod_token("pod-uid-1")).await;
    assert_ne!(first.key, second.key);
    let c2 = temp_client(&env, &second, Some(&second.token));
    assert_eq!(
        meter(&c2, "requests", hour + 60, 7, None).await,
        Ok(id.clone())
    );
    assert_eq!(
        meter(&c2, "requests", hour, 8, None).await,
        Err("DuplicateRequestException".into())
    );
    // Another pod of the same role is another instance.
    let other = assume_role(&env, "web-identity-token-1", &pod_token("pod-uid-2")).await;
    let c3 = temp_client(&env, &other, Some(&other.token));
    assert!(meter(&c3, "requests", hour, 8, None).await.is_ok());
    let records = env.emu.records();
    assert_eq!(records.len(), 2);
    assert_eq!(
        records[0].identity,
        "123456789012:assumed-role/meterd/pod-uid-1"
    );
    assert_eq!(
        records[1].identity,
        "123456789012:assumed-role/meterd/pod-uid-2"
    );

    // The session token is part of the credentials.
    for token in [
        None,
        Some(format!("{}x", second.token).as_str()),
        Some(first.token.as_str()),
    ] {
        let c = temp_client(&env, &second, token);
        assert_eq!(
            meter(&c, "gigabytes", hour, 1, None).await,
            Err("UnrecognizedClientException".into())
        );
    }
    let wrong_secret = TempCreds {
        secret: "nope".to_owned(),
        ..second
    };
    let c = temp_client(&env, &wrong_secret, Some(&wrong_secret.token));
    assert_eq!(
        meter(&c, "gigabytes", hour, 1, None).await,
        Err("InvalidSignatureException".into())
    );

    // GetCallerIdentity names the role session (temporary) or the user (long-term key).
    let who = [("Action", "GetCallerIdentity"), ("Version", "2011-06-15")];
    let (status, xml) = sts_call(
        &env,
        &who,
        Some((&first.key, &first.secret, Some(&first.token))),
    )
    .await;
    assert_eq!(status, 200, "{xml}");
    assert_eq!(
        xml_text(&xml, "Arn").as_deref(),
        Some("arn:aws:sts::123456789012:assumed-role/meterd/web-identity-token-1")
    );
    assert!(
        xml_text(&xml, "UserId")
            .is_some_and(|u| u.starts_with("AROA") && u.ends_with(":web-identity-token-1")),
        "{xml}"
    );
    assert_eq!(xml_text(&xml, "Account").as_deref(), Some("123456789012"));
    let (status, xml) = sts_call(&env, &who, Some(("AKIDGOOD", "right-secret", None))).await;
    assert_eq!(status, 200, "{xml}");
    assert_eq!(
        xml_text(&xml, "Arn").as_deref(),
        Some("arn:aws:iam::444455556666:user/AKIDGOOD")
    );
    let (status, xml) = sts_call(&env, &who, Some(("AKIDGOOD", "wrong", None))).await;
    assert_eq!(
        (status, xml_text(&xml, "Code").as_deref()),
        (400, Some("InvalidSignatureException")),
        "{xml}"
    );
    assert_eq!(xml_text(&xml, "Type").as_deref(), Some("Sender"));
    let (status, xml) = sts_call(&env, &who, None).await;
    assert_eq!(
        (status, xml_text(&xml, "Code").as_deref()),
        (400, Some("MissingAuthenticationTokenException")),
        "{xml}"
    );

    // Issued credentials expire on the emulator clock (default lifetime: 1 hour).
    env.clock.advance(Duration::from_secs(3600));
    assert_eq!(
        meter(&c2, "gigabytes", env.now(), 1, None).await,
        Err("ExpiredTokenException".into())
    );
}

#[tokio::test]
async fn assume_role_with_web_identity_validates_like_sts() {
    let env = start(creds_config()).await;
    let call =
        |role: &'static str, name: &'static str, token: String, duration: Option<&'static str>| {
            let env = &env;
            async move {
                let mut form = vec![
                    ("Action", "AssumeRoleWithWebIdentity"),
                    ("Version", "2011-06-15"),
                    ("RoleArn", role),
                    ("RoleSessionName", name),
                    ("WebIdentityToken", token.as_str()),
                ];
                if let Some(d) = duration {
                    form.push(("DurationSeconds", d));
                }
                let (status, xml) = sts_call(env, &form, None).await;
                (
                    status,
                    xml_text(&xml, "Code")
                        .unwrap_or_else(|| xml_text(&xml, "Expiration").unwrap_or(xml)),
                )
            }
        };
    let good = pod_token("u");
    assert_eq!(
        call(ROLE, "s1", good.clone(), Some("900")).await,
        (200, "2027-01-15T08:45:00Z".to_owned())
    );
    assert_eq!(
        call(ROLE, "s1", good.clone(), Some("899")).await,
        (400, "ValidationError".to_owned())
    );
    assert_eq!(
        call(ROLE, "s", good.clone(), None).await,
        (400, "ValidationError".to_owned())
    );
    assert_eq!(
        call(ROLE, "bad name!", good.clone(), None).await,
        (400, "ValidationError".to_owned())
    );
    assert_eq!(
        call(
            "arn:aws:iam::123456789012:user/meterd",
            "s1",
            good.clone(),
            None
        )
        .await,
        (400, "ValidationError".to_owned())
    );
    assert_eq!(
        call(ROLE, "s1", "not-a-jwt".to_owned(), None).await,
        (400, "InvalidIdentityToken".to_owned())
    );
    assert_eq!(
        call(ROLE, "s1", web_identity_token(json!({"aud": "x"})), None).await,
        (400, "InvalidIdentityToken".to_owned())
    );
    assert_eq!(
        call(
            ROLE,
            "s1",
            web_identity_token(json!({"sub": "x", "exp": T0 - 1})),
            None
        )
        .await,
        (400, "ExpiredTokenException".to_owned())
    );
    let (status, xml) = sts_call(
        &env,
        &[("Action", "AssumeRole"), ("Version", "2011-06-15")],
        None,
    )
    .await;
    assert_eq!(
        (status, xml_text(&xml, "Code").as_deref()),
        (400, Some("InvalidAction")),
        "{xml}"
    );
    let (status, xml) = sts_call(
        &env,
        &[
            ("Action", "AssumeRoleWithWebIdentity"),
            ("Version", "2011-06-15"),
        ],
        None,
    )
    .await;
    assert_eq!(
        (status, xml_text(&xml, "Code").as_deref()),
        (400, Some("ValidationError")),
        "{xml}"
    );
    assert!(xml.contains("Value null at &apos;roleArn&apos;"), "{xml}");
}

#[tokio::test]
async fn container_credentials_check_the_authorization_token_and_keep_the_task() {
    let env = start(creds_config()).await;
    let get = |path: &'static str, auth: Option<&'static str>| {
        let env = &env;
        async move {
            let mut headers = http::HeaderMap::new();
            headers.insert("host", env.emu.addr().to_string().parse().expect("host"));
            if let Some(a) = auth {
                headers.insert("authorization", a.parse().expect("auth"));
            }
            http(env.emu.addr(), "GET", path, headers, Vec::new())
                .await
                .expect("answers")
        }
    };
    assert_eq!(get("/v2/credentials/task-1", None).await.0, 401);
    assert_eq!(
        get("/v2/credentials/task-1", Some("task-1-tokeN")).await.0,
        403
    );
    assert_eq!(
        get("/v2/credentials/task-2", Some("task-1-token")).await.0,
        404
    );
    let fetch = || async {
        let (status, doc) = get("/v2/credentials/task-1", Some("task-1-token")).await;
        assert_eq!(status, 200, "{doc}");
        assert_eq!(doc["RoleArn"], ROLE);
        assert_eq!(doc["Expiration"], "2027-01-15T09:30:00Z");
        TempCreds {
            key: doc["AccessKeyId"].as_str().expect("key").to_owned(),
            secret: doc["SecretAccessKey"].as_str().expect("secret").to_owned(),
            token: doc["Token"].as_str().expect("token").to_owned(),
        }
    };
    let (a, b) = (fetch().await, fetch().await);
    assert_ne!(a.key, b.key, "every call rotates");
    let hour = hour_floor(T0);
    let id = meter(
        &temp_client(&env, &a, Some(&a.token)),
        "requests",
        hour,
        3,
        None,
    )
    .await
    .expect("task credentials are accepted");
    let cb = temp_client(&env, &b, Some(&b.token));
    assert_eq!(meter(&cb, "requests", hour, 3, None).await, Ok(id));
    assert_eq!(
        meter(&cb, "requests", hour, 4, None).await,
        Err("DuplicateRequestException".into())
    );
    let records = env.emu.records();
    assert_eq!(records.len(), 1);
    assert_eq!(
        records[0].identity,
        "123456789012:assumed-role/meterd/task-1"
    );
    // The call log keeps the access key ids each call claimed.
    let keys: std::collections::BTreeSet<String> = env
        .emu
        .calls()
        .into_iter()
        .filter_map(|c| c.identity)
        .collect();
    assert!(keys.contains(&a.key) && keys.contains(&b.key), "{keys:?}");
}

#[test]
fn temporary_credentials_config_is_validated() {
    let mut config = creds_config();
    config.temporary_credentials.duration = Duration::ZERO;
    config
        .temporary_credentials
        .tasks
        .push(meterd::emulator::credentials::ContainerTask {
            id: "task-1".to_owned(),
            role_arn: "arn:aws:iam::1:role/x".to_owned(),
            authorization_token: String::new(),
        });
    let problems = config.validate().expect_err("invalid").problems;
    assert_eq!(problems.len(), 4, "{problems:?}");
    let toml = format!(
        "{}\n[temporary_credentials]\nduration = \"15m\"\n[[temporary_credentials.tasks]]\nid = \"t\"\nrole_arn = \"{ROLE}\"\nauthorization_token = \"x\"\n",
        "region = \"us-east-1\""
    );
    let parsed: EmulatorConfig = toml::from_str(&toml).expect("parses");
    assert_eq!(
        parsed.temporary_credentials.duration,
        Duration::from_secs(900)
    );
    assert_eq!(parsed.temporary_credentials.tasks[0].id, "t");
}

// ---------------------------------------------------------------- License Manager

const BUYER: &str = "111122223333";
const MARKETPLACE_FINGERPRINT: &str = "aws:294406891311:AWS/Marketplace:issuer-fingerprint";

/// A License Manager client of the buyer's account (its key mapped to the demo license's
/// account) on the emulator.
fn license_client(env: &Env, key: &str) -> aws_sdk_licensemanager::Client {
    let conf = aws_sdk_licensemanager::Config::builder()
        .behavior_version(aws_sdk_licensemanager::config::BehaviorVersion::latest())
        .region(aws_sdk_licensemanager::config::Region::new("us-east-1"))
        .endpoint_url(env.emu.endpoint_url())
        .retry_config(aws_sdk_licensemanager::config::retry::RetryConfig::disabled())
        .credentials_provider(aws_sdk_licensemanager::config::Credentials::new(
            key, "secret", None, None, "test",
        ))
        .build();
    aws_sdk_licensemanager::Client::from_conf(conf)
}

/// The demo configuration, with `AKIDSTRANGER` in an account that holds no license (every
/// other key is the demo buyer's).
fn license_config() -> EmulatorConfig {
    let mut config = EmulatorConfig::demo();
    config
        .quotas
        .accounts
        .insert("AKIDSTRANGER".to_owned(), "999988887777".to_owned());
    for key in ["AKIDPODA", "AKIDPODB"] {
        config
            .quotas
            .accounts
            .insert(key.to_owned(), BUYER.to_owned());
    }
    config
}

fn seats(n: i64) -> aws_sdk_licensemanager::types::EntitlementData {
    aws_sdk_licensemanager::types::EntitlementData::builder()
        .name("Seats")
        .unit(aws_sdk_licensemanager::types::EntitlementDataUnit::Count)
        .value(n.to_string())
        .build()
        .expect("entitlement")
}

async fn checkout(
    c: &aws_sdk_licensemanager::Client,
    kind: aws_sdk_licensemanager::types::CheckoutType,
    wanted: Vec<aws_sdk_licensemanager::types::EntitlementData>,
    token: &str,
) -> Result<aws_sdk_licensemanager::operation::checkout_license::CheckoutLicenseOutput, String> {
    c.checkout_license()
        .product_sku(PRODUCT)
        .checkout_type(kind)
        .key_fingerprint(MARKETPLACE_FINGERPRINT)
        .set_entitlements(Some(wanted))
        .client_token(token)
        .send()
        .await
        .map_err(|e| code(&e))
}

/// The error code of a checkout of `n` seats that should fail.
async fn refused(
    c: &aws_sdk_licensemanager::Client,
    kind: aws_sdk_licensemanager::types::CheckoutType,
    n: i64,
    token: &str,
) -> Option<String> {
    checkout(c, kind, vec![seats(n)], token).await.err()
}

/// The Rust SDK against the emulator's License Manager: the buyer sees its license, a tier
/// feature checks out, two agents compete for a pool of 10 seats, a check-in and an expiry
/// return seats, an extension keeps them, a ClientToken retry is the same checkout, and the
/// failures answer the model's typed errors.
#[tokio::test]
async fn license_manager_checkouts_share_a_pool_and_expire_unless_extended() {
    use aws_sdk_licensemanager::types::{CheckoutType, EntitlementData, EntitlementDataUnit};
    let env = start(license_config()).await;
    let a = license_client(&env, "AKIDPODA");
    let b = license_client(&env, "AKIDPODB");

    let listed = a.list_received_licenses().send().await.expect("list");
    let arns: Vec<&str> = listed
        .licenses()
        .iter()
        .filter_map(|l| l.license_arn())
        .collect();
    assert_eq!(arns, [DEMO_LICENSE_ARN]);
    let license = a
        .get_license()
        .license_arn(DEMO_LICENSE_ARN)
        .send()
        .await
        .expect("get")
        .license
        .expect("license");
    assert_eq!(license.product_sku(), Some(PRODUCT));
    assert_eq!(
        license.issuer().and_then(|i| i.key_fingerprint()),
        Some(MARKETPLACE_FINGERPRINT)
    );
    let names: Vec<&str> = license.entitlements().iter().map(|e| e.name()).collect();
    assert_eq!(names, ["Tier", "Seats"]);

    // A feature: the tier comes back with its value.
    let tier = EntitlementData::builder()
        .name("Tier")
        .unit(EntitlementDataUnit::None)
        .build()
        .expect("tier");
    let out = checkout(&a, CheckoutType::Provisional, vec![tier], "tier-1")
        .await
        .expect("tier");
    assert_eq!(out.entitlements_allowed()[0].value(), Some("Premium"));
    assert!(out.signed_token().is_some_and(|t| t.len() >= 4096));
    assert_eq!(out.license_arn(), Some(DEMO_LICENSE_ARN));

    // The pool: 6 + 4 fit in 10; one more does not, from either agent.
    let six = checkout(&a, CheckoutType::Provisional, vec![seats(6)], "a-1")
        .await
        .expect("six");
    let again = checkout(&a, CheckoutType::Provisional, vec![seats(6)], "a-1")
        .await
        .expect("the same ClientToken");
    assert_eq!(
        again.license_consumption_token(),
        six.license_consumption_token()
    );
    checkout(&b, CheckoutType::Provisional, vec![seats(4)], "b-1")
        .await
        .expect("four");
    assert_eq!(
        refused(&b, CheckoutType::Provisional, 1, "b-2")
            .await
            .as_deref(),
        Some("NoEntitlementsAllowedException")
    );
    // A check-in returns six seats; the same token cannot be checked in twice.
    let six_token = six.license_consumption_token().expect("token").to_owned();
    a.check_in_license()
        .license_consumption_token(&six_token)
        .send()
        .await
        .expect("check in");
    let e = a
        .check_in_license()
        .license_consumption_token(&six_token)
        .send()
        .await
        .expect_err("twice");
    assert_eq!(code(&e), "ConflictException");
    let five = checkout(&b, CheckoutType::Provisional, vec![seats(5)], "b-3")
        .await
        .expect("five of the six returned");
    // Extended at 50 minutes, the five are still held at 100; the four (never extended)
    // expired at 60 and are back in the pool.
    env.clock.advance(Duration::from_secs(50 * 60));
    b.extend_license_consumption()
        .license_consumption_token(five.license_consumption_token().expect("token"))
        .send()
        .await
        .expect("extend");
    env.clock.advance(Duration::from_secs(50 * 60));
    checkout(&a, CheckoutType::Provisional, vec![seats(5)], "a-2")
        .await
        .expect("the four expired");
    assert_eq!(
        refused(&a, CheckoutType::Provisional, 1, "a-3")
            .await
            .as_deref(),
        Some("NoEntitlementsAllowedException"),
        "the extended five are still held"
    );
    let consumptions = env.emu.license_consumptions();
    let held: i64 = consumptions
        .iter()
        .filter(|c| c.holds(meterd::clock::unix_seconds(env.clock.now())))
        .flat_map(|c| &c.entitlements)
        .filter(|e| e.name == "Seats")
        .map(|e| e.amount)
        .sum();
    assert_eq!(held, 10);

    // Failures, typed.
    let e = a
        .checkout_license()
        .product_sku("prod-other")
        .checkout_type(CheckoutType::Provisional)
        .key_fingerprint(MARKETPLACE_FINGERPRINT)
        .entitlements(seats(1))
        .client_token("x-1")
        .send()
        .await
        .expect_err("unknown SKU");
    assert_eq!(code(&e), "ResourceNotFoundException");
    let stranger = license_client(&env, "AKIDSTRANGER");
    assert_eq!(
        refused(&stranger, CheckoutType::Provisional, 1, "s-1")
            .await
            .as_deref(),
        Some("ResourceNotFoundException"),
        "another account has no license"
    );
    let e = a
        .extend_license_consumption()
        .license_consumption_token("lct-nope")
        .send()
        .await
        .expect_err("unknown token");
    assert_eq!(code(&e), "ResourceNotFoundException");
    assert_eq!(
        checkout(&a, CheckoutType::from("LATER"), vec![seats(1)], "v-1")
            .await
            .err()
            .as_deref(),
        Some("ValidationException")
    );
}

/// PERPETUAL checkouts draw down for good and cannot be checked in; faults injected for
/// License Manager answer its own error types.
#[tokio::test]
async fn license_manager_perpetual_drawdown_and_faults() {
    use aws_sdk_licensemanager::types::CheckoutType;
    let env = start(license_config()).await;
    let a = license_client(&env, "AKIDPODA");
    let drawn = checkout(&a, CheckoutType::Perpetual, vec![seats(7)], "p-1")
        .await
        .expect("seven");
    assert!(drawn.expiration().is_none());
    env.clock.advance(Duration::from_secs(10 * 3600));
    assert_eq!(
        refused(&a, CheckoutType::Provisional, 4, "p-2")
            .await
            .as_deref(),
        Some("NoEntitlementsAllowedException"),
        "drawn down for good"
    );
    let e = a
        .check_in_license()
        .license_consumption_token(drawn.license_consumption_token().expect("token"))
        .send()
        .await
        .expect_err("perpetual");
    assert_eq!(code(&e), "ConflictException");

    env.emu.set_faults(FaultProfile::only(
        Operation::CheckoutLicense,
        FaultRule {
            throttle_rate: 1.0,
            ..FaultRule::default()
        },
    ));
    let e = a
        .checkout_license()
        .product_sku(PRODUCT)
        .checkout_type(CheckoutType::Provisional)
        .key_fingerprint(MARKETPLACE_FINGERPRINT)
        .entitlements(seats(1))
        .client_token("f-1")
        .send()
        .await
        .expect_err("throttled");
    assert!(
        matches!(
            e.as_service_error(),
            Some(aws_sdk_licensemanager::operation::checkout_license::CheckoutLicenseError::RateLimitExceededException(_))
        ),
        "{e:?}"
    );
}

/// GetAccessToken exchanges the buyer's license token (signed or not: a buyer outside AWS
/// has no credentials yet) for an access token; an unknown token is refused.
#[tokio::test]
async fn license_manager_get_access_token() {
    let env = start(license_config()).await;
    let a = license_client(&env, "AKIDPODA");
    let out = a
        .get_access_token()
        .token(meterd::emulator::config::DEMO_LICENSE_TOKEN)
        .send()
        .await
        .expect("signed");
    assert!(out
        .access_token()
        .is_some_and(|t| t.split('.').count() == 3));
    let e = a
        .get_access_token()
        .token("not-a-license-token")
        .send()
        .await
        .expect_err("unknown");
    assert_eq!(code(&e), "AccessDeniedException");
    let mut headers = http::HeaderMap::new();
    headers.insert("host", env.emu.addr().to_string().parse().expect("host"));
    headers.insert(
        "content-type",
        "application/x-amz-json-1.1".parse().expect("ct"),
    );
    headers.insert(
        "x-amz-target",
        "AWSLicenseManager.GetAccessToken".parse().expect("target"),
    );
    let body = json!({"Token": meterd::emulator::config::DEMO_LICENSE_TOKEN}).to_string();
    let (status, answer) = http(env.emu.addr(), "POST", "/", headers, body.into_bytes())
        .await
        .expect("answer");
    assert_eq!(status, 200, "{answer}");
    assert!(answer["AccessToken"].is_string());
}

#[test]
fn offline_calls_reach_the_credential_endpoints_as_served() {
    let mut config = creds_config();
    config.credentials.clear();
    let emu = emulator::Offline::new(config, ManualClock::at_unix(T0)).expect("builds");
    let form: &[(&[u8], &[u8])] = &[(b"content-type", b"application/x-www-form-urlencoded")];
    let body = format!(
        "Action=AssumeRoleWithWebIdentity&Version=2011-06-15&RoleArn={}&RoleSessionName=s1&WebIdentityToken={}",
        ROLE.replace(':', "%3A").replace('/', "%2F"),
        pod_token("u-1")
    );
    let answer = emu
        .call(b"POST", b"/", form, body.as_bytes())
        .expect("valid HTTP")
        .expect("answered");
    assert_eq!(
        (answer.status, answer.content_type.as_deref()),
        (200, Some("text/xml"))
    );
    let xml = String::from_utf8_lossy(&answer.body);
    assert!(xml.starts_with("<AssumeRoleWithWebIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><AssumeRoleWithWebIdentityResult>"), "{xml}");
    let answer = emu
        .call(b"POST", b"/", form, b"Action=Nope&Version=2011-06-15")
        .expect("valid HTTP")
        .expect("answered");
    assert_eq!(answer.status, 400);
    assert!(String::from_utf8_lossy(&answer.body).starts_with("<ErrorResponse"));
    let auth: &[(&[u8], &[u8])] = &[(b"authorization", b"task-1-token")];
    let answer = emu
        .call(b"GET", b"/v2/credentials/task-1", auth, b"")
        .expect("valid HTTP")
        .expect("answered");
    assert_eq!(
        (answer.status, answer.content_type.as_deref()),
        (200, Some("application/json"))
    );
    // Any other path is still the Metering Service.
    let answer = emu
        .call(b"GET", b"/v1/credentials", auth, b"")
        .expect("valid HTTP")
        .expect("answered");
    assert_eq!(answer.status, 400);
    assert!(String::from_utf8_lossy(&answer.body).contains("UnknownOperationException"));
}

/// The Rust SDK against an emulator whose clock is weeks from the wall clock, with a
/// signature skew check: the first call, signed by the wall clock, is refused; the SDK takes
/// the skew from that answer's `Date` (the emulator's clock) and its next call passes.
#[tokio::test]
async fn the_rust_sdk_corrects_its_clock_from_a_shifted_emulator() {
    let mut config = EmulatorConfig::demo();
    config.signature_max_skew = Some(Duration::from_secs(15 * 60));
    let env = start(config).await;
    let wall = meterd::clock::unix_seconds(std::time::SystemTime::now());
    assert!(
        (T0 - wall).abs() > 24 * 3600,
        "the test clock must be far from the wall clock"
    );
    let c = env.default_client().await;
    let hour = hour_floor(T0) - 3600;
    let first = meter(&c, "requests", hour, 1, None).await;
    assert_eq!(first, Err("InvalidSignatureException".to_owned()));
    let second = meter(&c, "requests", hour, 1, None).await;
    assert!(second.is_ok(), "after the skew correction: {second:?}");
    assert_eq!(env.emu.records().len(), 1);
}
