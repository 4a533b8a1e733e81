-- Route chest radiographs to the cxr_platform DICOM node, and never route its results back.
--
-- Orthanc calls OnStoredInstance for every instance it stores. Only CR, DX and secondary
-- capture images (the SOP classes the node classifies) are forwarded; the node's own results (SR,
-- SEG, parametric map, secondary capture, sent by the AE title below with Manufacturer
-- "cxr_platform") are never forwarded, so a result can never loop back into the AI. The node ignores non-chest and
-- lateral images itself, with a logged reason, so the PACS side stays simple.
--
-- Keep AI_MODALITY equal to the node's name under "DicomModalities" and AI_AET to its AE title.

local AI_MODALITY = 'cxr-ai'
local AI_AET = 'CXR_AI'
local AI_MANUFACTURER = 'cxr_platform'

local ROUTED_SOP_CLASSES = {
  ['1.2.840.10008.5.1.4.1.1.1'] = true,      -- Computed Radiography Image Storage
  ['1.2.840.10008.5.1.4.1.1.1.1'] = true,    -- Digital X-Ray Image Storage - For Presentation
  ['1.2.840.10008.5.1.4.1.1.1.1.1'] = true,  -- Digital X-Ray Image Storage - For Processing
  -- Film digitisers and some archives store chest radiographs as Secondary Capture; the node
  -- judges those by their pixels (its input gate) and ignores what is not a chest radiograph.
  ['1.2.840.10008.5.1.4.1.1.7'] = true,      -- Secondary Capture Image Storage
  ['1.2.840.10008.5.1.4.1.1.7.2'] = true,    -- Multi-frame Grayscale Byte Secondary Capture
  ['1.2.840.10008.5.1.4.1.1.7.3'] = true,    -- Multi-frame Grayscale Word Secondary Capture
}

function OnStoredInstance(instanceId, tags, metadata, origin)
  if metadata['RemoteAET'] == AI_AET or tags['Manufacturer'] == AI_MANUFACTURER then
    return
  end
  local sopClass = tags['SOPClassUID'] or metadata['SopClassUid']
  if not ROUTED_SOP_CLASSES[sopClass] then
    return
  end
  -- SendToModality queues a job; the original stays in PACS (no Delete).
  SendToModality(instanceId, AI_MODALITY)
end
