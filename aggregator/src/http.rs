//! The HTTP side: the advertiser query API, the late table, the OpenAPI
//! description, /metrics, /healthz and /readyz.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::config::{Bearer, Tokens};
use crate::metrics::Metrics;
use crate::store::{self, Store};
use wire::time::{format_time, parse_time};

pub const OPENAPI: &str = include_str!("../../docs/openapi.yaml");
/// The advertiser dashboard: one static page; its data comes from the query
/// API with the advertiser's own token, so it can show nothing the API
/// would not.
pub const DASHBOARD: &str = include_str!("dashboard.html");

pub struct Api {
    pub store: Arc<Store>,
    pub tokens: Tokens,
    pub metrics: Arc<Metrics>,
    pub query_max_points: usize,
    pub ready: AtomicBool,
    /// In a cluster: who owns which advertiser, and where each instance's
    /// query API is.
    pub cluster: Option<ClusterRoute>,
    /// Answers for advertisers this instance does not own, when set;
    /// otherwise they are forwarded to their owner.
    pub clickhouse: Option<crate::clickhouse::Client>,
    /// Every query from ClickHouse (`clickhouse.serve_all_queries`).
    pub clickhouse_for_all: bool,
    /// `retention.rows_ms`, named in refusals of queries past it.
    pub rows_retention_ms: i64,
    pub forward: Forwarder,
    /// Limits of reconcile jobs.
    pub reconcile: crate::reconcile::Settings,
}

pub struct ClusterRoute {
    pub ids: Arc<Vec<String>>,
    pub me: usize,
    pub http: Vec<std::net::SocketAddr>,
}

impl Api {
    /// The instance that owns `advertiser`, when that is not this one.
    fn owner_elsewhere(&self, advertiser: &str) -> Option<usize> {
        let c = self.cluster.as_ref()?;
        let o = wire::partition::owner(advertiser, &c.ids);
        (o != c.me).then_some(o)
    }
}

pub type Forwarder = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Empty<bytes::Bytes>,
>;

pub fn forwarder() -> Forwarder {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

/// Marks a query forwarded by another instance: answered here or refused,
/// never forwarded again (two instances with different lists would loop).
const FORWARDED: &str = "x-clickgate-forwarded";

pub fn router(api: Arc<Api>) -> Router {
    Router::new()
        .route("/api/v1/advertisers/analytics", get(analytics))
        .route("/api/v1/advertisers/late", get(late))
        .route(
            "/api/v1/admin/reconcile",
            post(reconcile_start).get(reconcile_list),
        )
        .route("/api/v1/admin/reconcile/{id}", get(reconcile_job))
        .route("/api/v1/admin/reconciled", get(reconciled))
        .route("/api/v1/admin/unrecorded", get(unrecorded))
        .route(
            "/api/v1/openapi.yaml",
            get(|| async { ([(header::CONTENT_TYPE, "application/yaml")], OPENAPI) }),
        )
        .route(
            "/dashboard",
            get(|| async {
                (
                    [
                        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                        (header::CACHE_CONTROL, "no-cache"),
                    ],
                    DASHBOARD,
                )
            }),
        )
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(api)
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({ "error": msg.into() }))).into_response()
}

/// Who presents the request's bearer token: 401 without a known one.
fn bearer<'a>(api: &'a Api, headers: &HeaderMap) -> Result<Bearer<'a>, Box<Response>> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(token) = presented else {
        return Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            "missing bearer token (Authorization: Bearer <token>)",
        )));
    };
    api.tokens
        .bearer(token)
        .ok_or_else(|| Box::new(error(StatusCode::UNAUTHORIZED, "unknown bearer token")))
}

/// The advertiser the request may read: 401 without a known bearer token,
/// 403 when the token belongs to another advertiser (or is an admin's).
fn authorize(api: &Api, headers: &HeaderMap, advertiser: &str) -> Result<(), Box<Response>> {
    match bearer(api, headers)? {
        Bearer::Advertiser(a) if a == advertiser || a == "*" => Ok(()),
        Bearer::Advertiser(_) => Err(Box::new(error(
            StatusCode::FORBIDDEN,
            "this token may not read that advertiser",
        ))),
        Bearer::Admin => Err(Box::new(error(
            StatusCode::FORBIDDEN,
            "an admin token reads no advertiser's data",
        ))),
    }
}

/// An administrator: 401 without a known token, 403 for an advertiser's.
fn authorize_admin(api: &Api, headers: &HeaderMap) -> Result<(), Box<Response>> {
    match bearer(api, headers)? {
        Bearer::Admin => Ok(()),
        Bearer::Advertiser(_) => Err(Box::new(error(
            StatusCode::FORBIDDEN,
            "this endpoint needs an admin token ([[admin]] in the tokens file)",
        ))),
    }
}

/// Parses and checks the analytics parameters.
pub fn parse_query(p: &HashMap<String, String>, max_points: usize) -> Result<store::Query, String> {
    const KNOWN: &[&str] = &[
        "advertiser_id",
        "start_time",
        "end_time",
        "granularity",
        "campaign_id",
        "ad_id",
    ];
    if let Some(k) = p.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(format!("unknown parameter {k:?}"));
    }
    let need = |k: &str| {
        p.get(k)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| format!("{k} is required"))
    };
    let advertiser_id = need("advertiser_id")?.clone();
    let start_s = parse_time(need("start_time")?).map_err(|e| format!("start_time: {e}"))?;
    let end_s = parse_time(need("end_time")?).map_err(|e| format!("end_time: {e}"))?;
    if end_s <= start_s {
        return Err("end_time must be after start_time".into());
    }
    let bucket_s = match p.get("granularity").map(String::as_str).unwrap_or("1m") {
        "1m" => 60,
        "1h" => 3600,
        "1d" => 86_400,
        g => return Err(format!("granularity {g:?}: one of 1m, 1h, 1d")),
    };
    let buckets = ((end_s - start_s) as u64).div_ceil(bucket_s as u64);
    if buckets as usize > max_points {
        return Err(format!(
            "{buckets} buckets asked; at most {max_points} per query (use a coarser granularity)"
        ));
    }
    Ok(store::Query {
        advertiser_id,
        start_s,
        end_s,
        bucket_s,
        campaign_id: p.get("campaign_id").cloned(),
        ad_id: p.get("ad_id").cloned(),
    })
}

/// Forwards a query to the instance that owns its advertiser; its answer,
/// status and body, is the answer.
async fn forward(
    api: &Api,
    owner: std::net::SocketAddr,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
) -> Response {
    use http_body_util::BodyExt;
    let target = format!(
        "http://{owner}{}",
        uri.path_and_query().map_or("/", |p| p.as_str())
    );
    let mut req = hyper::Request::get(target).header(FORWARDED, "1");
    if let Some(a) = headers.get(header::AUTHORIZATION) {
        req = req.header(header::AUTHORIZATION, a);
    }
    let Ok(req) = req.body(http_body_util::Empty::new()) else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot build the forwarded request",
        );
    };
    let answer = async {
        let resp = api.forward.request(req).await?;
        let status = resp.status();
        let ctype = resp.headers().get(header::CONTENT_TYPE).cloned();
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, ctype, body))
    };
    match tokio::time::timeout(std::time::Duration::from_secs(30), answer).await {
        Ok(Ok((status, ctype, body))) => {
            let mut r = (status, body).into_response();
            if let Some(c) = ctype {
                r.headers_mut().insert(header::CONTENT_TYPE, c);
            }
            r
        }
        Ok(Err(e)) => error(
            StatusCode::BAD_GATEWAY,
            format!("the owning instance {owner}: {e}"),
        ),
        Err(_) => error(
            StatusCode::GATEWAY_TIMEOUT,
            format!("the owning instance {owner} did not answer"),
        ),
    }
}

async fn analytics(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    Query(p): Query<HashMap<String, String>>,
) -> Response {
    let t0 = Instant::now();
    let q = match parse_query(&p, api.query_max_points) {
        Ok(q) => q,
        Err(e) => {
            api.metrics.query_errors.fetch_add(1, Relaxed);
            return error(StatusCode::BAD_REQUEST, e);
        }
    };
    if let Err(r) = authorize(&api, &headers, &q.advertiser_id) {
        api.metrics.query_errors.fetch_add(1, Relaxed);
        return *r;
    }
    let owner = api.owner_elsewhere(&q.advertiser_id);
    let from_clickhouse = owner.is_some() || api.clickhouse_for_all;
    let answered = match (owner, &api.clickhouse) {
        // Another instance's advertiser (or every query, when so set):
        // ClickHouse holds every instance's rows; without it, the owner
        // answers.
        (_, Some(ch)) if from_clickhouse => {
            ch.query(&q).await.map(|(s, w)| (s, w, None)).map_err(|e| {
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("ClickHouse: {e:#}"),
                )
            })
        }
        (Some(o), _) => {
            let c = api.cluster.as_ref().expect("an owner implies a cluster");
            if headers.contains_key(FORWARDED) {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "forwarded here, but advertiser {:?} belongs to {:?}: the instances' [cluster] lists differ",
                        q.advertiser_id, c.ids[o]
                    ),
                );
            }
            return forward(&api, c.http[o], &uri, &headers).await;
        }
        (None, _) => {
            let st = api.clone();
            let q2 = q.clone();
            match tokio::task::spawn_blocking(move || {
                let now = crate::now_ms();
                // Rows before this are dropped: never a partial answer.
                let kept_from = st.store.rows_kept_from()? as i64 * 60;
                if q2.start_s < kept_from {
                    return Ok(Err(kept_from));
                }
                Ok::<_, store::StoreError>(Ok((
                    st.store.query(&q2, now)?,
                    st.store.watermark(now)?,
                    Some(st.store.unique_users(&q2)?),
                )))
            })
            .await
            {
                Ok(Ok(Ok(v))) => Ok(v),
                Ok(Ok(Err(kept_from))) => match &api.clickhouse {
                    Some(ch) => ch.query(&q).await.map(|(s, w)| (s, w, None)).map_err(|e| {
                        error(
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!(
                                "before {} rows are in ClickHouse only: {e:#}",
                                format_time(kept_from)
                            ),
                        )
                    }),
                    None => {
                        api.metrics.query_errors.fetch_add(1, Relaxed);
                        return error(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            format!(
                                "start_time is before {}: this aggregator keeps minute rows for retention.rows_ms = {} ms, and no ClickHouse is configured to answer past it",
                                format_time(kept_from),
                                api.rows_retention_ms
                            ),
                        );
                    }
                },
                Ok(Err(e)) => Err(error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
                Err(e) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
            }
        }
    };
    let (series, wm, uniques) = match answered {
        Ok(v) => v,
        Err(r) => return r,
    };
    // Typed and serialized in one pass (a JSON value tree per point cost
    // more than the query itself); each bucket's time formatted once.
    let stamps: HashMap<i64, String> = series
        .keys()
        .map(|(t, _)| *t)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .map(|t| (t, format_time(t)))
        .collect();
    let points: Vec<Point<'_>> = series
        .iter()
        .filter(|((t, _), _)| *t + q.bucket_s > q.start_s && *t < q.end_s)
        .map(|((t, ad), (c, state, ver))| Point {
            timestamp: &stamps[t],
            ad_id: ad,
            clicks: c.clicks,
            impressions: c.impressions,
            total_spend: c.spend_micros as f64 / 1e6,
            total_spend_micros: c.spend_micros,
            ctr: (c.impressions > 0).then(|| c.clicks as f64 / c.impressions as f64),
            duplicates: c.duplicates,
            invalid: c.invalid,
            unique_users: uniques
                .as_ref()
                .map(|u| u.get(&(*t, ad.clone())).copied().unwrap_or(0)),
            is_final: *state != crate::merge::PointState::Provisional,
            state: state.as_str(),
            version: *ver,
        })
        .collect();
    let body = Analytics {
        advertiser_id: &q.advertiser_id,
        granularity: p.get("granularity").map(String::as_str).unwrap_or("1m"),
        start_time: format_time(q.start_s),
        end_time: format_time(q.end_s),
        watermark: format_time(wm / 1000),
        series: points,
    };
    let resp = Json(body).into_response();
    api.metrics.queries.fetch_add(1, Relaxed);
    api.metrics
        .query_latency
        .observe(t0.elapsed().as_micros() as u64);
    resp
}

/// One point of the analytics answer (`docs/openapi.yaml`).
#[derive(serde::Serialize)]
struct Point<'a> {
    timestamp: &'a str,
    ad_id: &'a str,
    clicks: u64,
    impressions: u64,
    total_spend: f64,
    total_spend_micros: u64,
    ctr: Option<f64>,
    duplicates: u64,
    invalid: u64,
    /// Distinct users of the accepted clicks (merged sketches); null when
    /// the answer came from ClickHouse, which holds no sketches.
    unique_users: Option<u64>,
    #[serde(rename = "final")]
    is_final: bool,
    /// provisional, final or reconciled.
    state: &'static str,
    version: u32,
}

#[derive(serde::Serialize)]
struct Analytics<'a> {
    advertiser_id: &'a str,
    granularity: &'a str,
    start_time: String,
    end_time: String,
    watermark: String,
    series: Vec<Point<'a>>,
}

async fn late(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    Query(p): Query<HashMap<String, String>>,
) -> Response {
    let Some(adv) = p.get("advertiser_id").filter(|a| !a.is_empty()).cloned() else {
        return error(StatusCode::BAD_REQUEST, "advertiser_id is required");
    };
    if let Err(r) = authorize(&api, &headers, &adv) {
        return *r;
    }
    // The late table is kept by the owner only.
    if let (Some(o), Some(c)) = (api.owner_elsewhere(&adv), &api.cluster) {
        if !headers.contains_key(FORWARDED) {
            return forward(&api, c.http[o], &uri, &headers).await;
        }
    }
    let st = api.clone();
    let rows = match tokio::task::spawn_blocking(move || st.store.late_rows()).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let out: Vec<_> = rows
        .iter()
        .filter(|(k, _)| k.advertiser_id == adv)
        .map(|(k, r)| {
            json!({
                "timestamp": format_time(k.minute as i64 * 60),
                "campaign_id": k.campaign_id,
                "ad_id": k.ad_id,
                "clicks": r.counts.clicks,
                "impressions": r.counts.impressions,
                "total_spend_micros": r.counts.spend_micros,
            })
        })
        .collect();
    Json(json!({ "advertiser_id": adv, "late": out })).into_response()
}

/// Runs `f` on the blocking pool; a store error is a 503.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, store::StoreError> + Send + 'static,
) -> Result<T, Response> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
        Err(e) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

/// `POST /api/v1/admin/reconcile` with `{"start_time": T, "end_time": T}`
/// (Unix seconds or YYYY-MM-DDTHH:MM:SSZ): starts a job, answers 202 with
/// its id at once.
async fn reconcile_start(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Err(r) = authorize_admin(&api, &headers) {
        api.metrics.admin_errors.fetch_add(1, Relaxed);
        return *r;
    }
    let bad = |api: &Api, m: String| {
        api.metrics.admin_errors.fetch_add(1, Relaxed);
        error(StatusCode::BAD_REQUEST, m)
    };
    let v: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return bad(
                &api,
                format!("the body must be JSON {{\"start_time\": .., \"end_time\": ..}}: {e}"),
            )
        }
    };
    let time = |k: &str| -> Result<i64, String> {
        match v.get(k) {
            Some(serde_json::Value::String(s)) => parse_time(s).map_err(|e| format!("{k}: {e}")),
            Some(serde_json::Value::Number(n)) => {
                n.as_i64().ok_or_else(|| format!("{k}: not an integer"))
            }
            Some(_) => Err(format!("{k}: a string or Unix seconds")),
            None => Err(format!("{k} is required")),
        }
    };
    if let Some(obj) = v.as_object() {
        if let Some(k) = obj
            .keys()
            .find(|k| !["start_time", "end_time"].contains(&k.as_str()))
        {
            return bad(&api, format!("unknown field {k:?}"));
        }
    }
    let range = time("start_time").and_then(|s| {
        let e = time("end_time")?;
        crate::reconcile::job_range(&api.reconcile, s, e)
    });
    let (m0, m1) = match range {
        Ok(r) => r,
        Err(e) => return bad(&api, e),
    };
    let st = api.clone();
    let created = blocking(move || {
        crate::reconcile::create_job(&st.store, &st.reconcile, m0, m1, crate::now_ms())
    })
    .await;
    match created {
        Err(r) => r,
        Ok(Err(why)) => {
            api.metrics.admin_errors.fetch_add(1, Relaxed);
            error(StatusCode::TOO_MANY_REQUESTS, why)
        }
        Ok(Ok(id)) => {
            tracing::info!(job = id, start = %format_time(m0 as i64 * 60), end = %format_time(m1 as i64 * 60), "reconcile job started");
            (
                StatusCode::ACCEPTED,
                [(header::LOCATION, format!("/api/v1/admin/reconcile/{id}"))],
                Json(json!({
                    "job_id": id,
                    "start_time": format_time(m0 as i64 * 60),
                    "end_time": format_time(m1 as i64 * 60),
                })),
            )
                .into_response()
        }
    }
}

fn job_json(j: &crate::reconcile::Job) -> serde_json::Value {
    let mut v = serde_json::to_value(j).unwrap_or_default();
    v["start_time"] = json!(format_time(j.start_minute as i64 * 60));
    v["end_time"] = json!(format_time(j.end_minute as i64 * 60));
    v["minutes_done"] = json!((j.next_minute - j.start_minute) as u64);
    v
}

async fn reconcile_job(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(r) = authorize_admin(&api, &headers) {
        api.metrics.admin_errors.fetch_add(1, Relaxed);
        return *r;
    }
    let Ok(id) = id.parse::<u64>() else {
        return error(StatusCode::BAD_REQUEST, "a job id is a number");
    };
    let st = api.clone();
    match blocking(move || crate::reconcile::job(&st.store, id)).await {
        Err(r) => r,
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no reconcile job {id}")),
        Ok(Some(j)) => Json(job_json(&j)).into_response(),
    }
}

async fn reconcile_list(State(api): State<Arc<Api>>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize_admin(&api, &headers) {
        api.metrics.admin_errors.fetch_add(1, Relaxed);
        return *r;
    }
    let st = api.clone();
    match blocking(move || st.store.jobs()).await {
        Err(r) => r,
        Ok(jobs) => {
            let list: Vec<_> = jobs
                .iter()
                .filter_map(|(_, j)| serde_json::from_str::<crate::reconcile::Job>(j).ok())
                .map(|j| job_json(&j))
                .collect();
            Json(json!({ "jobs": list })).into_response()
        }
    }
}

/// An admin request's `start_time`..`end_time` as minutes (refused by
/// [`crate::reconcile::job_range`]'s rules), or the answer that refuses it,
/// counted in `admin_errors_total`.
fn admin_minutes(
    api: &Api,
    headers: &HeaderMap,
    p: &HashMap<String, String>,
) -> Result<(u32, u32), Box<Response>> {
    let refused = |r: Box<Response>| {
        api.metrics.admin_errors.fetch_add(1, Relaxed);
        r
    };
    authorize_admin(api, headers).map_err(refused)?;
    let t = |k: &str| {
        parse_time(p.get(k).ok_or_else(|| format!("{k} is required"))?)
            .map_err(|e| format!("{k}: {e}"))
    };
    (|| crate::reconcile::job_range(&api.reconcile, t("start_time")?, t("end_time")?))()
        .map_err(|e| refused(Box::new(error(StatusCode::BAD_REQUEST, e))))
}

/// `GET /api/v1/admin/reconciled?start_time=..&end_time=..`: each minute's
/// last reconcile (when, events read, rows corrected), the minutes that
/// failed with why, and where the frontier stands.
async fn reconciled(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Query(p): Query<HashMap<String, String>>,
) -> Response {
    let (m0, m1) = match admin_minutes(&api, &headers, &p) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    let st = api.clone();
    let got = blocking(move || {
        Ok((
            st.store.reconciled_minutes(m0, m1)?,
            st.store.failed_minutes(m0, m1)?,
            st.store.reconcile_view(crate::now_ms())?.frontier,
            st.store.dirty_minutes(10_000)?,
        ))
    })
    .await;
    match got {
        Err(r) => r,
        Ok((marks, failed, frontier, dirty)) => Json(json!({
            "frontier": format_time(frontier as i64 * 60),
            "minutes": marks.iter().map(|(m, k)| json!({
                "minute": format_time(*m as i64 * 60),
                "reconciled_at_ms": k.at_ms,
                "events": k.events,
                "rows_corrected": k.rows_corrected,
                "skipped_sources": k.skipped_sources,
                "dirty": dirty.iter().any(|(d, _)| d == m),
            })).collect::<Vec<_>>(),
            "failed": failed.iter().map(|(m, why)| json!({
                "minute": format_time(*m as i64 * 60),
                "reason": why,
            })).collect::<Vec<_>>(),
        }))
        .into_response(),
    }
}

/// `GET /api/v1/admin/unrecorded?start_time=..&end_time=..`: per event
/// minute, gateway and shard, the clicks and impressions answered without a
/// record while that gateway's log was full (`log.on_full = "redirect"`).
/// None of them is billed; this is what was given away.
async fn unrecorded(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Query(p): Query<HashMap<String, String>>,
) -> Response {
    let (m0, m1) = match admin_minutes(&api, &headers, &p) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    let st = api.clone();
    match blocking(move || st.store.unrecorded(m0, m1)).await {
        Err(r) => r,
        Ok(rows) => Json(json!({
            "minutes": rows.iter().map(|(m, gw, shard, n)| json!({
                "minute": format_time(*m as i64 * 60),
                "gateway_id": gw,
                "shard": shard,
                "unrecorded": n,
            })).collect::<Vec<_>>(),
            "total": rows.iter().map(|r| r.3).sum::<u64>(),
        }))
        .into_response(),
    }
}

async fn metrics(State(api): State<Arc<Api>>) -> Response {
    let st = api.clone();
    let (lag, sources) = tokio::task::spawn_blocking(move || {
        let now = crate::now_ms();
        let wm = st.store.watermark(now).unwrap_or(0);
        let n = st.store.sources().map(|s| s.len()).unwrap_or(0);
        (if wm > 0 { now - wm } else { 0 }, n)
    })
    .await
    .unwrap_or((0, 0));
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        api.metrics.render(lag, sources),
    )
        .into_response()
}

async fn readyz(State(api): State<Arc<Api>>) -> Response {
    if api.ready.load(Relaxed) {
        // Ready to apply and serve; what is degraded is said below it.
        let mut body = String::from("ready\n");
        let upload = api.metrics.audit.last_error.lock().unwrap().clone();
        if !upload.is_empty() {
            body.push_str(&format!(
                "audit upload failing (retried with back-off; {} (hour, gateway) files waiting): {upload}\n",
                api.metrics.audit.backlog_hours.load(Relaxed)
            ));
        }
        let kafka = api.metrics.kafka.last_error.lock().unwrap().clone();
        if !kafka.is_empty() {
            let k = &api.metrics.kafka;
            body.push_str(&format!(
                "kafka sink failing (retried with back-off; {} rows and {} raw-event entries waiting): {kafka}\n",
                k.backlog_rows.load(Relaxed),
                k.backlog_entries.load(Relaxed)
            ));
        }
        let too_large = api.metrics.kafka.too_large.load(Relaxed);
        if too_large > 0 {
            body.push_str(&format!(
                "kafka sink passed over {too_large} record(s) the broker refused as too large; last: {}\n",
                api.metrics.kafka.last_too_large.lock().unwrap()
            ));
        }
        (StatusCode::OK, body).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(s: &str) -> HashMap<String, String> {
        s.split('&')
            .filter(|x| !x.is_empty())
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap();
                (k.to_owned(), v.to_owned())
            })
            .collect()
    }

    #[test]
    fn bad_parameters_say_why() {
        let ok = parse_query(
            &params("advertiser_id=a&start_time=0&end_time=3600&granularity=1h"),
            10,
        )
        .unwrap();
        assert_eq!((ok.start_s, ok.end_s, ok.bucket_s), (0, 3600, 3600));
        for (q, want) in [
            ("start_time=0&end_time=60", "advertiser_id is required"),
            ("advertiser_id=a&end_time=60", "start_time is required"),
            ("advertiser_id=a&start_time=x&end_time=60", "start_time: "),
            (
                "advertiser_id=a&start_time=60&end_time=60",
                "end_time must be after",
            ),
            (
                "advertiser_id=a&start_time=0&end_time=60&granularity=5m",
                "granularity",
            ),
            (
                "advertiser_id=a&start_time=0&end_time=6000",
                "buckets asked",
            ),
            (
                "advertiser_id=a&start_time=0&end_time=60&colour=red",
                "unknown parameter",
            ),
        ] {
            let e = parse_query(&params(q), 10).unwrap_err();
            assert!(e.contains(want), "{q}: {e}");
        }
    }
}
