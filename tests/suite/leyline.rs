//! Leyline messages: round trips, wire facts of esper.leyline.v1, malformed bytes.
use std::collections::BTreeMap;

use prost::Message;
use tezzeret::base::leyline::*;
use tezzeret::ErrorCode;

fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(message: M) {
    let bytes = encode(&message);
    let back: M = decode(&bytes).expect("decodes");
    assert_eq!(back, message);
}

#[test]
fn every_message_round_trips() {
    let mut params = BTreeMap::new();
    params.insert("scale".to_string(), BlueprintParameterBounds { min_value: 0.5, max_value: 2.0 });
    params.insert("depth".to_string(), BlueprintParameterBounds { min_value: 1.0, max_value: 4.0 });
    round_trip(BlueprintDescriptor {
        blueprint_id: "BP002".into(),
        name: "linear_projection".into(),
        tier: BlueprintTier::Experimental as i32,
        allowed_parameters: params,
        risk: 0.25,
        stage: 3,
        quarantine_only: true,
        approval_required: true,
        description: "Linear projection layer".into(),
    });
    let ts = Some(Timestamp { seconds: 1_700_000_000, nanos: 123 });
    round_trip(KernelPrefetchRequest {
        request_id: "r1".into(),
        blueprint_id: "BP001".into(),
        training_run_id: "run-7".into(),
        issued_at: ts,
    });
    round_trip(KernelArtifactReady {
        request_id: "r1".into(),
        blueprint_id: "BP001".into(),
        artifact_ref: "/state/artifacts/x.pt".into(),
        checksum: "ab".repeat(32),
        guard_digest: "cd".repeat(32),
        prewarm_p50_ms: 0.5,
        prewarm_p95_ms: 0.75,
    });
    round_trip(KernelArtifactError {
        request_id: "r2".into(),
        blueprint_id: "BP404".into(),
        reason: "artifact_not_found".into(),
    });
    round_trip(KernelCatalogUpdate {
        blueprint_id: "BP003".into(),
        artifact_ref: "a.pt".into(),
        checksum: "00".repeat(32),
        guard_digest: "11".repeat(32),
        compile_ms: 12.5,
        prewarm_ms: 0.125,
    });
    let mut attrs = BTreeMap::new();
    attrs.insert("strategy".to_string(), "standard".to_string());
    round_trip(TelemetryPacket {
        packet_id: "p".into(),
        timestamp: ts,
        source_subsystem: "tezzeret".into(),
        level: TelemetryLevel::Warning as i32,
        metrics: vec![MetricPoint { name: "tezzeret.jobs.total".into(), value: 3.0, unit: "count".into(), attributes: attrs.clone() }],
        events: vec![TelemetryEvent {
            event_id: "e".into(),
            description: "tezzeret.compile_failed".into(),
            level: TelemetryLevel::Error as i32,
            attributes: attrs.clone(),
        }],
        spans: vec![TraceSpan { span_id: "s".into(), parent_span_id: String::new(), name: "compile".into() }],
        system_health: Some(SystemHealth {
            status: HealthStatus::Degraded as i32,
            summary: "conservative".into(),
            indicators: attrs.clone(),
        }),
    });
    round_trip(BusEnvelope { message_type: BusMessageType::KernelCatalogUpdate as i32, payload: vec![1, 2, 3], attributes: attrs });
}

#[test]
fn wire_bytes_match_the_leyline_field_numbers() {
    // BlueprintDescriptor{blueprint_id: "BP1" (1, len), tier: SAFE (3, varint), stage: 2 (6, varint)}
    let d = BlueprintDescriptor { blueprint_id: "BP1".into(), tier: BlueprintTier::Safe as i32, stage: 2, ..Default::default() };
    assert_eq!(encode(&d), [0x0a, 3, b'B', b'P', b'1', 0x18, 0x01, 0x30, 0x02]);
    // allowed_parameters (4) is a map entry {1: key, 2: BlueprintParameterBounds{1: double, 2: double}}
    let mut p = BlueprintDescriptor::default();
    p.allowed_parameters.insert("k".into(), BlueprintParameterBounds { min_value: 1.0, max_value: 0.0 });
    let mut expected = vec![0x22, 14, 0x0a, 1, b'k', 0x12, 9, 0x09];
    expected.extend_from_slice(&1.0f64.to_le_bytes());
    assert_eq!(encode(&p), expected);
    // KernelCatalogUpdate.compile_ms is field 5, a float (fixed32).
    let u = KernelCatalogUpdate { compile_ms: 1.5, ..Default::default() };
    let mut expected = vec![0x2d];
    expected.extend_from_slice(&1.5f32.to_le_bytes());
    assert_eq!(encode(&u), expected);
    // TelemetryPacket: level is field 4, metrics field 10, events 20, health 40.
    let t = TelemetryPacket { level: 2, metrics: vec![MetricPoint::default()], events: vec![TelemetryEvent::default()], system_health: Some(SystemHealth::default()), ..Default::default() };
    assert_eq!(encode(&t), [0x20, 0x02, 0x52, 0x00, 0xa2, 0x01, 0x00, 0xc2, 0x02, 0x00]);
    // Enum numbering.
    assert_eq!(CircuitBreakerState::HalfOpen as i32, 3);
    assert_eq!(MessagePriority::Critical as i32, 4);
    assert_eq!(BusMessageType::KernelPrefetchError as i32, 8);
    assert_eq!(HealthStatus::Critical as i32, 4);
}

#[test]
fn malformed_bytes_are_refused_naming_the_problem() {
    // Truncated length-delimited field.
    let err = decode::<BlueprintDescriptor>(&[0x0a, 0x05, b'B']).unwrap_err();
    assert_eq!(err.code(), ErrorCode::Malformed);
    assert!(err.message().contains("BlueprintDescriptor"), "{err}");
    // blueprint_id (field 1) sent as a varint: the field is named.
    let err = decode::<BlueprintDescriptor>(&[0x08, 0x01]).unwrap_err();
    assert!(err.message().contains("blueprint_id"), "{err}");
    // Invalid UTF-8 inside a string field.
    let err = decode::<KernelPrefetchRequest>(&[0x12, 0x02, 0xff, 0xfe]).unwrap_err();
    assert!(err.message().contains("blueprint_id"), "{err}");
    // Garbage never panics.
    for len in 0..64u8 {
        let bytes: Vec<u8> = (0..len).map(|i| i.wrapping_mul(37).wrapping_add(len)).collect();
        let _ = decode::<BlueprintDescriptor>(&bytes);
        let _ = decode::<TelemetryPacket>(&bytes);
    }
}
