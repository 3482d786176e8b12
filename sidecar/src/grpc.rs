//! The Open Inference Protocol over gRPC (`inference.GRPCInferenceService`).

use std::sync::Arc;

use meshserve_proto::TensorSpec;
use meshserve_proto::grpc::{request_from_grpc, response_to_grpc};
use meshserve_proto::inference::grpc_inference_service_server::GrpcInferenceService;
use meshserve_proto::inference::model_metadata_response::TensorMetadata;
use meshserve_proto::inference::repository_index_response::ModelIndex;
use meshserve_proto::inference::{
    ModelInferRequest, ModelInferResponse, ModelMetadataRequest, ModelMetadataResponse,
    ModelReadyRequest, ModelReadyResponse, RepositoryIndexRequest, RepositoryIndexResponse,
    RepositoryModelLoadRequest, RepositoryModelLoadResponse, RepositoryModelUnloadRequest,
    RepositoryModelUnloadResponse, ServerLiveRequest, ServerLiveResponse, ServerMetadataRequest,
    ServerMetadataResponse, ServerReadyRequest, ServerReadyResponse,
};
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use crate::error::ApiError;
use crate::service::{EXTENSIONS, SERVER_NAME, SERVER_VERSION, Service};
use crate::telemetry::{grpc_span, postprocess_span, preprocess_span, record_grpc_status, timed};

#[derive(Debug, Clone)]
pub struct GrpcService {
    service: Arc<Service>,
}

impl GrpcService {
    pub fn new(service: Arc<Service>) -> Self {
        GrpcService { service }
    }
}

fn metadata(specs: &[TensorSpec]) -> Vec<TensorMetadata> {
    specs
        .iter()
        .map(|s| TensorMetadata {
            name: s.name.clone(),
            datatype: s.datatype.as_str().to_owned(),
            shape: s.shape.clone(),
        })
        .collect()
}

/// The model a repository call names: Triton's clients put it in `model_name`; KServe's
/// variant of these messages has the model name as field 1, which is `repository_name` here.
fn repository_model(repository_name: String, model_name: String) -> Result<String, Status> {
    match (model_name.is_empty(), repository_name.is_empty()) {
        (false, _) => Ok(model_name),
        (true, false) => Ok(repository_name),
        (true, true) => Err(Status::invalid_argument("model_name is required")),
    }
}

fn failed(error: ApiError) -> Status {
    if matches!(error, ApiError::Internal(_)) {
        tracing::warn!(%error, "gRPC request failed");
    }
    error.to_status()
}

impl GrpcService {
    async fn infer(&self, message: ModelInferRequest) -> Result<ModelInferResponse, Status> {
        let permit = self.service.admit().map_err(failed)?;
        let (prepared, took) = timed(preprocess_span(), || request_from_grpc(message));
        let (model, version, request) = prepared.map_err(|e| failed(e.into()))?;
        let (found, explainer) = match self.service.explained_model(&model, &version).await {
            Some(explained) => (explained, Some(model)),
            None => (
                self.service.model(&model, &version).await.map_err(failed)?,
                None,
            ),
        };
        if let Some(name) = explainer {
            // MLServer's form of `:explain`: one permit for the whole explanation.
            let _permit = permit;
            let response = crate::explain::explain_v2(found, &name, request)
                .await
                .map_err(failed)?;
            return Ok(response_to_grpc(response));
        }
        found.observe_preprocess(took);
        let response = self
            .service
            .infer(permit, Arc::clone(&found), request)
            .await
            .map_err(failed)?;
        let (response, took) = timed(postprocess_span(), || response_to_grpc(response));
        found.observe_postprocess(took);
        Ok(response)
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for GrpcService {
    async fn server_live(
        &self,
        _: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse {
            live: self.service.is_live(),
        }))
    }

    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse {
            ready: self.service.is_ready(),
        }))
    }

    async fn model_ready(
        &self,
        request: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let request = request.into_inner();
        // An unknown model is simply not ready: clients ask this to poll, and tritonclient
        // raises on an error status instead of returning false.
        let ready = self
            .service
            .repository()
            .is_model_ready(&request.name, &request.version)
            .unwrap_or(false);
        Ok(Response::new(ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: SERVER_NAME.to_owned(),
            version: SERVER_VERSION.to_owned(),
            extensions: EXTENSIONS.iter().map(|e| (*e).to_owned()).collect(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let request = request.into_inner();
        let repository = self.service.repository();
        let model = self
            .service
            .model(&request.name, &request.version)
            .await
            .map_err(failed)?;
        let versions = repository
            .versions(&request.name)
            .map_err(|e| failed(e.into()))?;
        Ok(Response::new(ModelMetadataResponse {
            name: request.name,
            versions: versions.iter().map(u64::to_string).collect(),
            platform: meshserve_predictor::PLATFORM.to_owned(),
            inputs: metadata(model.inputs()),
            outputs: metadata(model.outputs()),
        }))
    }

    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let (metadata, _, message) = request.into_parts();
        let span = grpc_span("ModelInfer", &metadata.into_headers());
        let result = self.infer(message).instrument(span.clone()).await;
        record_grpc_status(&span, result.as_ref().err());
        result.map(Response::new)
    }

    async fn repository_index(
        &self,
        request: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        let models = self
            .service
            .repository()
            .index(request.into_inner().ready)
            .into_iter()
            .map(|e| ModelIndex {
                name: e.name,
                version: e.version,
                state: e.state,
                reason: e.reason,
            })
            .collect();
        Ok(Response::new(RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        request: Request<RepositoryModelLoadRequest>,
    ) -> Result<Response<RepositoryModelLoadResponse>, Status> {
        let request = request.into_inner();
        if let Some(key) = request
            .parameters
            .keys()
            .find(|k| *k == "config" || k.starts_with("file:"))
        {
            return Err(Status::invalid_argument(format!(
                "load parameter '{key}' is not supported: edit the model repository instead"
            )));
        }
        let model = repository_model(request.repository_name, request.model_name)?;
        self.service.load(&model).await.map_err(failed)?;
        Ok(Response::new(RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        request: Request<RepositoryModelUnloadRequest>,
    ) -> Result<Response<RepositoryModelUnloadResponse>, Status> {
        let request = request.into_inner();
        let model = repository_model(request.repository_name, request.model_name)?;
        self.service.unload(&model).map_err(failed)?;
        Ok(Response::new(RepositoryModelUnloadResponse {}))
    }
}
