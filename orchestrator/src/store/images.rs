//! The store's mirror of the imager cache: layers, images, failed builds.

use crate::model::PatchId;
use certo_imager::{BuildError, Built, ImageRecord, ImageRequest, LayerRecord};
use chrono::{DateTime, TimeZone, Utc};
use serde::Serialize;

use super::{Store, StoreError};

/// An image as `certo image ls` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ImageRow {
    pub digest: String,
    pub release: String,
    pub platform: String,
    pub node_type: String,
    pub patch_id: Option<i64>,
    pub patch_revision: Option<i32>,
    pub layers: Vec<String>,
    pub artefacts: serde_json::Value,
    pub size_bytes: i64,
    pub built_at: DateTime<Utc>,
    pub last_used_at: DateTime<Utc>,
}

/// A layer as `certo image ls --layers` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct LayerRow {
    pub digest: String,
    pub parent: Option<String>,
    pub kind: String,
    pub backend: String,
    pub size_bytes: i64,
    pub build_seconds: f64,
    pub built_at: DateTime<Utc>,
    pub last_used_at: DateTime<Utc>,
}

fn kind_str(record: &LayerRecord) -> String {
    serde_json::to_value(record.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn at(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(secs, 0).single().unwrap_or_default()
}

impl Store {
    /// Records a finished build: every layer (bottom first) and the image; marks them used now.
    pub async fn record_build(&self, built: &Built) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for (layer, _) in &built.layers {
            upsert_layer(&mut tx, layer).await?;
        }
        upsert_image(&mut tx, &built.image).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records the layers of the cache that the store does not know yet (after a
    /// failed image build, the lower layers that were built are still cache entries).
    pub async fn record_layers(&self, layers: &[LayerRecord]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut sorted: Vec<&LayerRecord> = layers.iter().collect();
        // Parents first: a layer's kind orders the stack.
        sorted.sort_by_key(|l| l.kind as u8);
        for layer in sorted {
            upsert_layer(&mut tx, layer).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Records a failed build as evidence.
    pub async fn record_build_failure(
        &self,
        request: &ImageRequest,
        error: &BuildError,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO image_build_failures
               (release, platform, node_type, patch_id, patch_revision, layer_kind, phase,
                package, exit_status, message, log_tail)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(&request.release)
        .bind(&request.platform.label)
        .bind(&request.node_type)
        .bind(request.patch.as_ref().map(|p| PatchId(p.id)))
        .bind(request.patch.as_ref().map(|p| p.revision as i32))
        .bind(error.layer.map(certo_imager::error::layer_name))
        .bind(error.phase.as_str())
        .bind(&error.package)
        .bind(error.exit_status)
        .bind(&error.message)
        .bind(serde_json::to_value(&error.log_tail).unwrap_or_default())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Images, most recently used first.
    pub async fn list_images(&self) -> Result<Vec<ImageRow>, StoreError> {
        self.images_where(None).await
    }

    /// One image by its digest.
    pub async fn image_row(&self, digest: &str) -> Result<Option<ImageRow>, StoreError> {
        Ok(self.images_where(Some(digest)).await?.into_iter().next())
    }

    async fn images_where(&self, digest: Option<&str>) -> Result<Vec<ImageRow>, StoreError> {
        type Row = (
            String,
            String,
            String,
            String,
            Option<i64>,
            Option<i32>,
            Vec<String>,
            serde_json::Value,
            i64,
            DateTime<Utc>,
            DateTime<Utc>,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT digest, release, platform, node_type, patch_id, patch_revision, layers,
                    artefacts, size_bytes, built_at, last_used_at
             FROM images WHERE ($1::text IS NULL OR digest = $1)
             ORDER BY last_used_at DESC, digest",
        )
        .bind(digest)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| ImageRow {
                digest: r.0,
                release: r.1,
                platform: r.2,
                node_type: r.3,
                patch_id: r.4,
                patch_revision: r.5,
                layers: r.6,
                artefacts: r.7,
                size_bytes: r.8,
                built_at: r.9,
                last_used_at: r.10,
            })
            .collect())
    }

    /// Layers, bottom of the stack first.
    pub async fn list_layers(&self) -> Result<Vec<LayerRow>, StoreError> {
        type Row = (
            String,
            Option<String>,
            String,
            String,
            i64,
            f64,
            DateTime<Utc>,
            DateTime<Utc>,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT digest, parent, kind, backend, size_bytes, build_seconds, built_at, last_used_at
             FROM image_layers
             ORDER BY array_position(ARRAY['core','base','node_type','patch','custom'], kind), built_at",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| LayerRow {
                digest: r.0,
                parent: r.1,
                kind: r.2,
                backend: r.3,
                size_bytes: r.4,
                build_seconds: r.5,
                built_at: r.6,
                last_used_at: r.7,
            })
            .collect())
    }

    /// When each image and layer was last used, by digest.
    pub async fn last_used(&self) -> Result<Vec<(String, DateTime<Utc>)>, StoreError> {
        let rows: Vec<(String, DateTime<Utc>)> = sqlx::query_as(
            "SELECT digest, last_used_at FROM images UNION ALL SELECT digest, last_used_at FROM image_layers",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// Forgets removed images and layers (children before parents), in one transaction.
    pub async fn forget_images(
        &self,
        images: &[String],
        layers: &[LayerRecord],
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM images WHERE digest = ANY($1)")
            .bind(images)
            .execute(&mut *tx)
            .await?;
        let mut sorted: Vec<&LayerRecord> = layers.iter().collect();
        sorted.sort_by_key(|l| std::cmp::Reverse(l.kind as u8));
        for layer in sorted {
            sqlx::query("DELETE FROM image_layers WHERE digest = $1")
                .bind(layer.digest.to_hex())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

async fn upsert_layer(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    layer: &LayerRecord,
) -> Result<(), StoreError> {
    let inputs = serde_json::json!({
        "repositories": layer.repositories,
        "packages": layer.packages,
        "config_files": layer.config_files,
    });
    sqlx::query(
        "INSERT INTO image_layers
           (digest, parent, kind, backend, inputs, installed, size_bytes, build_seconds, built_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
         ON CONFLICT (digest) DO UPDATE SET last_used_at = now()",
    )
    .bind(layer.digest.to_hex())
    .bind(layer.parent.map(|p| p.to_hex()))
    .bind(kind_str(layer))
    .bind(&layer.backend)
    .bind(inputs)
    .bind(serde_json::to_value(&layer.installed).unwrap_or_default())
    .bind(layer.size_bytes as i64)
    .bind(layer.build_seconds)
    .bind(at(layer.built_at))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn upsert_image(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    image: &ImageRecord,
) -> Result<(), StoreError> {
    let size: u64 = image.ext4().map_or(0, |a| a.size_bytes);
    let layers: Vec<String> = image.layers.iter().map(|l| l.to_hex()).collect();
    sqlx::query(
        "INSERT INTO images
           (digest, top_layer, layers, release, platform, node_type, patch_id, patch_revision,
            artefacts, size_bytes, export_seconds, built_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
         ON CONFLICT (digest) DO UPDATE SET last_used_at = now(), artefacts = EXCLUDED.artefacts",
    )
    .bind(&image.digest)
    .bind(layers.last().cloned().unwrap_or_default())
    .bind(&layers)
    .bind(&image.release)
    .bind(&image.platform)
    .bind(&image.node_type)
    .bind(image.patch.map(|p| PatchId(p.0)))
    .bind(image.patch.map(|p| p.1 as i32))
    .bind(serde_json::to_value(&image.artefacts).unwrap_or_default())
    .bind(size as i64)
    .bind(image.export_seconds)
    .bind(at(image.built_at))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// A layer with what its digest covers and how often builds found it in the cache.
#[derive(Debug, Clone, Serialize)]
pub struct LayerDetail {
    pub digest: String,
    pub parent: Option<String>,
    pub kind: String,
    pub backend: String,
    /// Repositories (id, SHA-256 of their metadata), packages (name, pinned version),
    /// configuration: the inputs of its digest.
    pub inputs: serde_json::Value,
    pub size_bytes: i64,
    pub build_seconds: f64,
    pub built_at: DateTime<Utc>,
    pub last_used_at: DateTime<Utc>,
    /// Build steps that took it from the cache, and that built it.
    pub cache_hits: i64,
    pub builds: i64,
}

type LayerDetailRow = (
    String,
    Option<String>,
    String,
    String,
    serde_json::Value,
    i64,
    f64,
    DateTime<Utc>,
    DateTime<Utc>,
    i64,
    i64,
);

impl Store {
    /// Every layer with its inputs and cache use, most recently used first.
    pub async fn layer_details(&self) -> Result<Vec<LayerDetail>, StoreError> {
        let rows: Vec<LayerDetailRow> = sqlx::query_as(
            "WITH use AS (
               SELECT l->>'digest' AS digest,
                      count(*) FILTER (WHERE l->>'outcome' = 'cached') AS hits,
                      count(*) FILTER (WHERE l->>'outcome' = 'built') AS builds
                 FROM engine_steps s, jsonb_each(s.outcome) e, jsonb_array_elements(
                        CASE WHEN jsonb_typeof(e.value->'layers') = 'array' THEN e.value->'layers' ELSE '[]'::jsonb END) l
                WHERE s.name = 'build' AND s.state = 'passed' AND jsonb_typeof(s.outcome) = 'object'
                GROUP BY 1)
             SELECT i.digest, i.parent, i.kind, i.backend, i.inputs, i.size_bytes, i.build_seconds,
                    i.built_at, i.last_used_at, coalesce(u.hits, 0), coalesce(u.builds, 0)
               FROM image_layers i LEFT JOIN use u ON u.digest = i.digest
              ORDER BY i.last_used_at DESC, i.digest",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| LayerDetail {
                digest: r.0,
                parent: r.1,
                kind: r.2,
                backend: r.3,
                inputs: r.4,
                size_bytes: r.5,
                build_seconds: r.6,
                built_at: r.7,
                last_used_at: r.8,
                cache_hits: r.9,
                builds: r.10,
            })
            .collect())
    }
}
