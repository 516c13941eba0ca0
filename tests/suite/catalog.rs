//! The embedded catalog and descriptor validation.
use std::collections::BTreeMap;

use tezzeret::build::catalog::{Catalog, Descriptor};
use tezzeret::base::leyline::{self, BlueprintDescriptor, BlueprintParameterBounds, BlueprintTier};
use tezzeret::ErrorCode;

#[test]
fn default_catalog_has_fifty_descriptors_eight_quarantined() {
    let catalog = Catalog::default_catalog();
    assert_eq!(catalog.len(), 50);
    let quarantined: Vec<&str> =
        catalog.descriptors().iter().filter(|d| d.is_quarantined()).map(|d| d.blueprint_id.as_str()).collect();
    assert_eq!(quarantined, ["BP043", "BP044", "BP045", "BP046", "BP047", "BP048", "BP049", "BP050"]);
    let se = catalog.get("BP016").unwrap();
    assert_eq!(se.name, "squeeze_excitation");
    assert_eq!(se.allowed_parameters["reduction"].min, 4.0);
    assert_eq!(se.allowed_parameters["reduction"].midpoint(), 10.0);
    // Every non-quarantined name has a builder.
    for d in catalog.descriptors().iter().filter(|d| !d.is_quarantined()) {
        assert!(tezzeret::build::blueprints::is_known(&d.name), "{} has no builder", d.name);
    }
}

fn valid() -> BlueprintDescriptor {
    let mut allowed_parameters = BTreeMap::new();
    allowed_parameters.insert("scale".into(), BlueprintParameterBounds { min_value: 0.5, max_value: 2.0 });
    BlueprintDescriptor {
        blueprint_id: "BP002".into(),
        name: "linear_projection".into(),
        tier: BlueprintTier::Safe as i32,
        allowed_parameters,
        risk: 0.1,
        ..Default::default()
    }
}

fn refused(message: BlueprintDescriptor, needle: &str) {
    let err = Descriptor::decode(&leyline::encode(&message)).unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidArgument, "{err}");
    assert!(err.message().contains(needle), "{err:?} should mention {needle:?}");
}

#[test]
fn invalid_descriptors_are_refused_with_the_field_named() {
    assert!(Descriptor::decode(&leyline::encode(&valid())).is_ok());
    refused(BlueprintDescriptor { blueprint_id: String::new(), ..valid() }, "blueprint_id is empty");
    refused(BlueprintDescriptor { blueprint_id: " BP2".into(), ..valid() }, "whitespace");
    refused(BlueprintDescriptor { name: String::new(), ..valid() }, "name");
    refused(BlueprintDescriptor { tier: 0, ..valid() }, "tier of BP002 is unspecified");
    refused(BlueprintDescriptor { tier: 9, ..valid() }, "tier of BP002 is unknown (9)");
    refused(BlueprintDescriptor { risk: f32::NAN, ..valid() }, "risk");
    let mut bad = valid();
    bad.allowed_parameters.insert("scale".into(), BlueprintParameterBounds { min_value: 3.0, max_value: 1.0 });
    refused(bad, "min 3 > max 1");
    let mut bad = valid();
    bad.allowed_parameters.insert("scale".into(), BlueprintParameterBounds { min_value: f64::NEG_INFINITY, max_value: 1.0 });
    refused(bad, "non-finite");
    let mut bad = valid();
    bad.allowed_parameters.insert(String::new(), BlueprintParameterBounds { min_value: 0.0, max_value: 1.0 });
    refused(bad, "empty parameter name");
}

#[test]
fn duplicate_ids_are_refused() {
    let d = Descriptor::decode(&leyline::encode(&valid())).unwrap();
    let err = Catalog::new(vec![d.clone(), d]).unwrap_err();
    assert!(err.message().contains("duplicate blueprint_id \"BP002\""), "{err}");
}

#[test]
fn json_catalog_errors_name_the_entry() {
    let err = Catalog::from_json(r#"[{"blueprint_id": "X", "name": "n", "tier": "BLUEPRINT_TIER_WEIRD"}]"#).unwrap_err();
    assert!(err.message().contains("catalog entry 0") && err.message().contains("BLUEPRINT_TIER_WEIRD"), "{err}");
    let err = Catalog::from_json("{not json").unwrap_err();
    assert_eq!(err.code(), ErrorCode::Malformed);
    let err = Catalog::from_json(r#"[{"blueprint_id": "X", "name": "n", "tier": "SAFE", "colour": 1}]"#).unwrap_err();
    assert!(err.message().contains("colour"), "{err}");
}

#[test]
fn content_hash_changes_with_the_descriptor() {
    let a = Descriptor::decode(&leyline::encode(&valid())).unwrap();
    let mut changed = valid();
    changed.allowed_parameters.insert("scale".into(), BlueprintParameterBounds { min_value: 0.5, max_value: 3.0 });
    let b = Descriptor::decode(&leyline::encode(&changed)).unwrap();
    assert_ne!(a.content_hash(), b.content_hash());
    assert_eq!(a.content_hash(), Descriptor::decode(&leyline::encode(&valid())).unwrap().content_hash());
}
