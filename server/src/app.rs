//! Assembling and running the server: routes, API-key checks, HTTP metrics,
//! loading the configured models in the background so `/health` answers
//! at once and `/ready` turns 200 when they are all loaded, and the graceful
//! stop on SIGTERM (crate::drain).

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::body::MessageBody;
use actix_web::dev::ServerHandle;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::{from_fn, Next};
use actix_web::{http::header, web, App, HttpServer};

use crate::config::ServerConfig;
use crate::engine::{weights_path, LoadedModel};
use crate::drain::{stop_signal, Drain, Tracked};
use crate::error::ApiError;
use crate::{admin, routes};
use crate::state::{AppState, ModelSlot};

/// Runs the server until SIGTERM or SIGINT, then drains: `/ready` 503, new
/// API requests 503, running ones finish within `listen.shutdown_grace_s`.
pub async fn serve(config: ServerConfig, home: std::path::PathBuf) -> anyhow::Result<()> {
    let state = web::Data::new(
        AppState::new(config.clone(), home).with_runtime(tokio::runtime::Handle::current()),
    );
    let address = (config.listen.host.clone(), config.listen.port);
    let app_state = state.clone();
    let mut server = HttpServer::new(move || {
        App::new()
            .app_data(app_state.clone())
            .wrap(from_fn(count_http))
            .configure(configure)
    })
    // The stop is ours (drain first), not actix's on the same signals.
    .disable_signals()
    .shutdown_timeout(1)
    .bind(address.clone())
    .map_err(|e| anyhow::anyhow!("cannot listen on {}:{}: {e}", address.0, address.1))?;
    if config.listen.workers > 0 {
        server = server.workers(config.listen.workers);
    }
    for addr in server.addrs() {
        tracing::info!("listening on http://{addr}");
        println!("fusechat: listening on http://{addr}");
    }
    let running = server.run();
    let grace = Duration::from_secs(config.listen.shutdown_grace_s);
    let stopper = tokio::spawn(stop_on_signal(
        state.drain.clone(),
        running.handle(),
        grace,
    ));
    let loader = tokio::spawn(load_all(state.into_inner()));
    let result = running.await;
    loader.abort();
    stopper.abort();
    result.map_err(Into::into)
}

/// Waits for SIGTERM/SIGINT, then drains and stops the HTTP server.
async fn stop_on_signal(drain: Arc<Drain>, server: ServerHandle, grace: Duration) {
    stop_signal().await;
    drain.begin();
    let running = drain.in_flight();
    tracing::info!(running, grace_s = grace.as_secs(), "shutting down: draining");
    println!(
        "fusechat: shutting down: /ready is 503, new requests get 503; waiting up to {}s for {running} running request(s)",
        grace.as_secs()
    );
    if drain.wait_idle(grace).await {
        println!("fusechat: every request finished; stopping");
    } else {
        let left = drain.in_flight();
        tracing::warn!(left, "grace period over; stopping with requests still running");
        println!("fusechat: grace period over with {left} request(s) still running; stopping");
    }
    server.stop(true).await;
}

/// Loads every configured model, one after the other.
async fn load_all(state: Arc<AppState>) {
    for model in state.config.models.clone() {
        let started = Instant::now();
        let outcome = match weights_path(&model, &state.home) {
            Ok(path) => LoadedModel::load(&model, &path, &state.home).await,
            Err(e) => Err(e),
        };
        match outcome {
            Ok(loaded) => {
                tracing::info!(model = %model.id, seconds = started.elapsed().as_secs_f64(), context = loaded.max_seq_len, "ready");
                println!("fusechat: model `{}` ready in {:.1}s", model.id, started.elapsed().as_secs_f64());
                state.set(&model.id, ModelSlot::Ready(Arc::new(loaded)));
            }
            Err(e) => {
                let why = format!("{e:#}");
                tracing::error!(model = %model.id, "failed to load: {why}");
                eprintln!("fusechat: model `{}` failed to load: {why}", model.id);
                state.set(&model.id, ModelSlot::Failed(why));
            }
        }
    }
    if state.all_ready() {
        println!("fusechat: all models ready");
    }
}

/// Routes and middleware; shared by `serve` and the tests.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/v1")
            .wrap(from_fn(require_api_key))
            .wrap(from_fn(refuse_when_draining))
            .service(
                web::resource("/chat/completions")
                    .route(web::post().to(routes::chat_completions))
                    .default_service(web::to(routes::method_not_allowed)),
            )
            .service(
                web::resource("/completions")
                    .route(web::post().to(routes::completions))
                    .default_service(web::to(routes::method_not_allowed)),
            )
            .service(
                web::resource("/responses")
                    .route(web::post().to(routes::responses))
                    .default_service(web::to(routes::method_not_allowed)),
            )
            .service(
                web::resource("/models")
                    .route(web::get().to(routes::list_models))
                    .default_service(web::to(routes::method_not_allowed)),
            )
            .service(
                web::resource("/models/{model}")
                    .route(web::get().to(routes::get_model))
                    .default_service(web::to(routes::method_not_allowed)),
            )
            .default_service(web::to(routes::not_found)),
    )
    // vLLM's tokenizer routes sit outside /v1 (lm-evaluation-harness looks
    // there), behind the same key and drain as the API.
    .service(
        web::resource("/tokenize")
            .wrap(from_fn(require_api_key))
            .wrap(from_fn(refuse_when_draining))
            .route(web::post().to(routes::tokenize))
            .default_service(web::to(routes::method_not_allowed)),
    )
    .service(
        web::resource("/tokenizer_info")
            .wrap(from_fn(require_api_key))
            .wrap(from_fn(refuse_when_draining))
            .route(web::get().to(routes::tokenizer_info))
            .default_service(web::to(routes::method_not_allowed)),
    )
    .service(
        web::resource("/detokenize")
            .wrap(from_fn(require_api_key))
            .wrap(from_fn(refuse_when_draining))
            .route(web::post().to(routes::detokenize))
            .default_service(web::to(routes::method_not_allowed)),
    )
    .service(
        web::scope("/admin")
            .wrap(from_fn(require_admin_key))
            .service(
                web::resource("/models")
                    .route(web::get().to(admin::list))
                    .route(web::post().to(admin::load_model))
                    .default_service(web::to(routes::method_not_allowed)),
            )
            .service(
                web::resource("/models/{id}")
                    .route(web::delete().to(admin::unload_model))
                    .default_service(web::to(routes::method_not_allowed)),
            )
            .service(
                web::resource("/aliases/{alias}")
                    .route(web::put().to(admin::set_alias))
                    .route(web::delete().to(admin::remove_alias))
                    .default_service(web::to(routes::method_not_allowed)),
            )
            .default_service(web::to(routes::not_found)),
    )
    .route("/health", web::get().to(routes::health))
    .route("/ready", web::get().to(routes::ready))
    .route("/metrics", web::get().to(routes::metrics))
    .route("/openapi.json", web::get().to(routes::openapi_json))
    .default_service(web::to(routes::not_found));
}

/// Wraps the whole app: counts requests by route, method and status.
async fn count_http(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = Instant::now();
    let route = req.match_pattern().unwrap_or_else(|| "unmatched".to_string());
    let method = req.method().to_string();
    let state = req.app_data::<web::Data<AppState>>().cloned();
    let response = next.call(req).await?;
    if let Some(state) = state {
        let status = response.status().as_u16().to_string();
        state
            .metrics
            .http_requests
            .with_label_values(&[&route, &method, &status])
            .inc();
        state
            .metrics
            .http_duration
            .with_label_values(&[&route, &method])
            .observe(started.elapsed().as_secs_f64());
    }
    Ok(response)
}

/// Counts every `/v1` request until its response body is done, and refuses
/// new ones once a shutdown has begun.
async fn refuse_when_draining(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let guard = match req.app_data::<web::Data<AppState>>() {
        Some(state) => Some(state.drain.enter().ok_or_else(ApiError::draining)?),
        None => None,
    };
    let response = next.call(req).await?;
    Ok(response
        .map_into_boxed_body()
        .map_body(|_, body| Tracked { body, guard }))
}

/// `/v1` needs `Authorization: Bearer <key>` when `auth.api_keys` is set.
async fn require_api_key(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let keys = req
        .app_data::<web::Data<AppState>>()
        .map(|s| s.config.auth.api_keys.clone())
        .unwrap_or_default();
    if !keys.is_empty() {
        check_bearer(&req, &keys)?;
    }
    next.call(req).await
}

/// `/admin` needs `Authorization: Bearer <auth.admin_key>`; without an admin
/// key configured, admin routes are closed.
async fn require_admin_key(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let key = req
        .app_data::<web::Data<AppState>>()
        .and_then(|s| s.config.auth.admin_key.clone());
    match key {
        Some(key) => check_bearer(&req, &[key])?,
        None => {
            return Err(ApiError::unauthorized(
                "Admin routes are closed: set auth.admin_key in the server config.",
            )
            .into())
        }
    }
    next.call(req).await
}

fn check_bearer(req: &ServiceRequest, keys: &[String]) -> Result<(), ApiError> {
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        return Err(ApiError::unauthorized(
            "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.",
        ));
    };
    let given = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or_default();
    if keys.iter().any(|k| constant_time_eq(k.as_bytes(), given.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::unauthorized("Incorrect API key provided."))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
